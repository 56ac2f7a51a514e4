"""Baselines that change the data, the model or its initialisation rather than the loss.

One file each, with one entry point of one shape, called by `logitguard train` before training:

    apply(cfg, model, tokenizer, rows, progress) -> (rows or model, report)

- `mixing`: safety-data mixing (Bianchi et al. 2023, "Safety-Tuned LLaMAs"): harmful prompts paired with
  refusals join the fine-tuning rows; returns the mixed rows.
- `salora`: SaLoRA (Li et al. 2025): a fixed safety projection and a task-informed initialisation of LoRA;
  returns the model with its adapter, whose `fold` writes the final adapter as plain LoRA.

`report` is a JSON-ready dict of what the method did (rows mixed, modules projected, ...); `logitguard train`
writes it beside the adapter and returns it. Safe LoRA, which acts after training on an adapter folder, is
`logitguard.safelora` (`logitguard safelora`).
"""
