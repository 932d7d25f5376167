from lm.adapters import check_vllm, vllm_max_lora_rank


def test_rank_rounds_up_to_a_vllm_rank():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 12, 16, 300, 512, 513)] == [1, 8, 8, 16, 16, 320, 512, None]


def test_plain_lora_is_servable():
    res = check_vllm({"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"})
    assert res == {"ok": True, "reasons": [], "max_lora_rank": 16, "rank": 16}


def test_unservable_features_are_named():
    res = check_vllm({"peft_type": "LORA", "r": 8, "use_dora": True, "modules_to_save": ["lm_head"],
                      "target_modules": ["q_proj", "embed_tokens"], "rank_pattern": {"q_proj": 600}})
    text = " ".join(res["reasons"])
    assert not res["ok"]
    for needle in ("DoRA", "modules_to_save", "embed_tokens", "exceeds"):
        assert needle in text


def test_other_peft_types_are_not_vllm_adapters():
    assert not check_vllm({"peft_type": "IA3"})["ok"]
    assert not check_vllm(None)["ok"]
