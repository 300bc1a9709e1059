"""The codec: the IMF networks (`codec.nn`), the encode/decode pipeline, files, the streaming
sender and receiver, and video I/O."""

import entropy  # noqa: F401  (first: compressai without its point-cloud extras, entropy.lean_compressai)
