"""Models that transform their head's output (soft-cap, scales): every loss path gives the model's own CE and
logits, read from the config table in logit_transform.py."""

import pytest
import torch
import transformers as tf

from logitguard.logit_transform import LogitTransform, LogitTransformError, logit_transform
from logitguard.reference import chunked_nll, head_tap

VOCAB = 50
COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.3)  # fmt: skip
# Transforms strong enough that the raw head's CE is visibly another number.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 1.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 0.25}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 3.0}),
    # the table's exceptions: HyperCLOVA X multiplies by logits_scaling; MiniCPM3 divides the head's input
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {"logits_scaling": 4.0}),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(dim_model_base=4, kv_lora_rank=8, q_lora_rank=8,
                 qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8)),
}  # fmt: skip


def tiny(family: str):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(tf, config_class)(**{**COMMON, **extra})
    return getattr(tf, model_class)(config).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, VOCAB, (2, 9), generator=g)
    labels = x.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return x, labels


IDS = torch.tensor([3, 17, 41])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_tap_ce_and_safety_logits_are_the_models_own(family):
    model = tiny(family)
    x, labels = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids=x, labels=labels)  # the model's own loss (token mean) and logits, transform included
    tokens = (labels[:, 1:] != -100).sum()
    own = torch.autograd.grad(out.loss * tokens + 0.1 * out.logits[..., IDS].pow(2).sum(), params)
    for full in (False, True):
        with head_tap(model, IDS, labels, full_logits=full, chunk_tokens=5) as tap:
            got = model(input_ids=x)
        assert got.logits.shape[1] == (x.shape[1] if full else 0)
        torch.testing.assert_close(tap["ce_sum"] / tap["ce_tokens"], out.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tap["safety"], out.logits[..., IDS], rtol=1e-5, atol=1e-5)
        ours = torch.autograd.grad(tap["ce_sum"] + 0.1 * tap["safety"].pow(2).sum(), params)
        for a, b in zip(ours, own):  # the head's weight (tied or not) included: grad_w carries dy/dz
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=f"{family}, full_logits={full}")
    if not logit_transform(model).identity:  # the test could fail: the raw head's CE is another number
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=x).last_hidden_state
            if family == "minicpm3":
                hidden = hidden / model.config.logits_scaling
            raw = chunked_nll(hidden[:, :-1][labels[:, 1:] != -100], model.lm_head.weight, None,
                              labels[:, 1:][labels[:, 1:] != -100], None)  # fmt: skip
        assert abs(raw / tokens - out.loss.detach()) > 0.05


def test_trainer_logs_the_models_own_ce_for_a_soft_capped_model(tmp_path):
    from helpers import training_args

    from logitguard.trainer import SafetyTrainer

    model = tiny("gemma2")
    x, labels = batch()
    with torch.no_grad():
        want = model(input_ids=x, labels=labels).loss
    trainer = SafetyTrainer(model=model, args=training_args(tmp_path), safety_ids=IDS.tolist(), reference=None,
                         reg_weight=0.0)  # fmt: skip
    model.train()
    loss = trainer.compute_loss(model, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels})
    torch.testing.assert_close(trainer._safety_metrics["train"]["ce"][-1], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transform", [LogitTransform(0.3), LogitTransform(1.0, 2.0), LogitTransform(2.5, 1.5)])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_nll_with_a_transform_matches_autograd(transform, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 7, 5, 11
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    direct = torch.nn.functional.cross_entropy(transform(hidden @ weight.T + bias), targets, reduction="sum")
    want = torch.autograd.grad(3.0 * direct, [hidden, weight, bias])
    ours = chunked_nll(hidden, weight, bias, targets, chunk, transform)
    got = torch.autograd.grad(3.0 * ours, [hidden, weight, bias])
    torch.testing.assert_close(ours, direct, rtol=1e-6, atol=1e-5)
    for a, b in zip(got, want):  # gradients up to ~7: 1e-5 is fp32 rounding (both sides are ~1e-6 off float64)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Holder(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


@pytest.mark.parametrize(
    "config, at_head, from_backbone",
    [
        (tf.LlamaConfig(), (1.0, None), (1.0, None)),
        (tf.Gemma2Config(final_logit_softcapping=30.0), (1.0, 30.0), (1.0, 30.0)),
        (tf.CohereConfig(logit_scale=0.0625), (0.0625, None), (0.0625, None)),
        (tf.GraniteConfig(logits_scaling=8.0), (0.125, None), (0.125, None)),
        (tf.FalconH1Config(lm_head_multiplier=0.5), (0.5, None), (0.5, None)),
        (tf.HyperCLOVAXConfig(logits_scaling=2.0), (2.0, None), (2.0, None)),  # multiplies
        (tf.MiniCPM3Config(dim_model_base=640), (1.0, None), (0.25, None)),  # divides the head's input
        (tf.MptConfig(logit_scale=2.0), (1.0, None), (1.0, None)),  # never applied by transformers' MPT
        (tf.RecurrentGemmaConfig(logits_soft_cap=30.0), (1.0, 30.0), (1.0, 30.0)),
        (tf.xLSTMConfig(output_logit_soft_cap=15.0), (1.0, 15.0), (1.0, 15.0)),
        # multimodal: the transform lives under text_config
        (tf.PaliGemmaConfig(text_config={"model_type": "gemma2", "final_logit_softcapping": 30.0}), (1.0, 30.0),
         (1.0, 30.0)),
        (tf.GraniteDoclingConfig(text_config={"model_type": "granite", "logits_scaling": 8.0}), (0.125, None),
         (0.125, None)),
        (tf.HyperCLOVAXVisionV2Config(text_config={"model_type": "hyperclovax", "logits_scaling": 2.0}), (2.0, None),
         (2.0, None)),
        (tf.Gemma3Config(text_config={"final_logit_softcapping": 30.0}), (1.0, None), (1.0, None)),  # no soft-cap
        (tf.MuseSparkConfig(text_config={"output_multiplier": 0.5, "final_logit_softcapping": 20.0}), (0.5, 20.0),
         (0.5, 20.0)),
    ],
)  # fmt: skip
def test_logit_transform_table(config, at_head, from_backbone):
    assert logit_transform(_Holder(config)) == LogitTransform(*at_head)
    assert logit_transform(_Holder(config), from_backbone=True) == LogitTransform(*from_backbone)


def test_an_unusable_transform_is_refused_in_one_line():
    with pytest.raises(LogitTransformError, match="final_logit_softcapping"):
        logit_transform(_Holder(tf.Gemma2Config(final_logit_softcapping=0.0)))
