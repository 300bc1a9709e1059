"""The codec: the IMF networks (`codec.nn`), the encode/decode pipeline, files, the streaming
sender and receiver, and video I/O."""
