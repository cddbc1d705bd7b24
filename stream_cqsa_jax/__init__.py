"""stream_cqsa_jax: exact attention over sequences larger than device memory.

The sequence is cut into chunks; a cyclic quorum set (a difference cover of
the chunk indices) splits attention into independent subproblems that each
hold a few chunks, compute every (query, key) pair exactly once, and merge
exactly into full attention.
"""

from ._src.attention import dot_product_attention
from ._src.budget import parse_budget
from ._src.plan import BudgetTooSmall, Plan, Subproblem, plan
from ._src.quorum import Cover, difference_cover, is_difference_cover
from ._src.sharded_plan import ShardedPlan, shard_plan
from ._src.streaming import stream_attention
from .flax_attention import attention_fn
from . import linen, nnx  # Flax modules: sc.nnx.StreamCQSAAttention, sc.linen.StreamCQSAAttention

__version__ = "0.1.0"

__all__ = [
    "BudgetTooSmall",
    "Cover",
    "Plan",
    "ShardedPlan",
    "Subproblem",
    "attention_fn",
    "difference_cover",
    "dot_product_attention",
    "is_difference_cover",
    "linen",
    "nnx",
    "parse_budget",
    "plan",
    "shard_plan",
    "stream_attention",
]
