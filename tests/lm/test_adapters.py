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


def test_rank_includes_rank_pattern_once_for_every_stage():
    from lm.adapters import AdapterSpec, lora_rank, mixed_batch_refusal

    pc = {"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 24}, "target_modules": ["q_proj", "v_proj"]}
    assert lora_rank(pc) == 24 == AdapterSpec.of(pc).rank == check_vllm(pc)["rank"]
    assert check_vllm(pc)["max_lora_rank"] == 32
    assert "rank 24 exceeds" in mixed_batch_refusal(pc, max_rank=16)
    assert mixed_batch_refusal(pc, max_rank=32, base_modules={"q_proj", "v_proj"}) is None
    assert "['v_proj']" in mixed_batch_refusal(pc, max_rank=32, base_modules={"q_proj"})


def test_flask_verdict_matches_what_the_server_refuses():
    from lm.adapters import servability

    assert servability({"peft_type": "LORA", "r": 4, "target_modules": "all-linear"})["flask"]["ok"]
    dora = servability({"peft_type": "LORA", "r": 4, "use_dora": True})["flask"]
    assert not dora["ok"] and "DoRA" in dora["reasons"][0]
    assert not servability({"peft_type": "IA3"})["flask"]["ok"]
