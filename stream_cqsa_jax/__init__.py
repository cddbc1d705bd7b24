"""stream_cqsa_jax: exact attention over sequences larger than device memory.

The sequence is cut into chunks; a cyclic quorum set (a difference cover of
the chunk indices) splits attention into independent subproblems that each
hold a few chunks, compute every (query, key) pair exactly once, and merge
exactly into full attention.
"""

from ._src.attention import dot_product_attention
from ._src.budget import parse_budget
from ._src.plan import Plan, Subproblem, plan
from ._src.quorum import Cover, difference_cover, is_difference_cover

__version__ = "0.1.0"

__all__ = [
    "Cover",
    "Plan",
    "Subproblem",
    "difference_cover",
    "dot_product_attention",
    "is_difference_cover",
    "parse_budget",
    "plan",
]
