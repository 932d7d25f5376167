"""The fused training step for LoRA and full fine-tuning of Llama-family models (train.fast).

`install(model, cfg)` replaces the model's forward with `FusedStep` when `training.fast_path` allows
it (auto: on CUDA) and the model is covered (plan.py); otherwise it prints one line saying why and
the transformers forward trains as before. The Trainer, its optimiser, checkpoints, resume and the
saved adapter or model are unchanged: the step computes the same loss on the same parameters, with
less padding, fewer launches and no full logits (decoder.py says how).
"""
