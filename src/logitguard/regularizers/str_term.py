"""STR (Eq. 2 of "Guardrails in Logit Space"): squared distance of the K safety logits to the aligned model's."""

from ..losses import str_per_sequence
from . import references
from .base import Regularizer, register

register(
    Regularizer(
        name="str",
        loss=str_per_sequence,
        per_sequence=str_per_sequence,
        normalization="sequences",
        reference="logits",
        cached=references.logits_cached,
        online=references.logits_online,
        # docs/real-model.md: on the real model's lambda frontier 0.3 meets the refusal margin under the attack and
        # is close to lambda 1 on refusal in benign fine-tuning (unresolved at the margin), with 70% of LoRA's task
        # gain where 1 keeps 39%
        default_weight=0.3,
        help="safety token regularization: squared distance of the K safety logits to the aligned model's",
    )
)
