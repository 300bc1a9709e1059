"""train."""

import entropy  # noqa: F401  (first: compressai without its point-cloud extras, entropy.lean_compressai)
