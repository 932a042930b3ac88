"""The base layer every other package imports, and which imports nothing of the project.

- ``errors``: :class:`TinyLMError`, the one type of a one-line user-facing error;
- ``files``: atomic writes, folder locks and JSON reading that fail with one line naming the path;
- ``tokenizer``: loading and fingerprinting a tokenizer, and the one encoder of conversations and
  documents (structure as ids, content literal); ``chat_template``: the ChatML template and its
  rendering to pieces; ``detokenize``: incremental detokenization for streaming.
"""
