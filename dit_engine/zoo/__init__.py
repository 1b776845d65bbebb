"""Zoos of labelled LoRA weight diffs: the store, its on-disk format, and the import/export formats.

- :mod:`.store` — :class:`Zoo` (create, open, append, read, recover, locking)
- :mod:`.format` — manifest and index rows, :class:`Diff`, :class:`BaseIdentity`, :class:`ZooError`
- :mod:`.shards` — shard files (headers, memory-mapped reads, digests, atomic writes)
- :mod:`.peft`, :mod:`.dit_paper`, :mod:`.dense` — PEFT adapter dirs, the DIT paper's ``.pt``
  files, dense diffs by SVD
"""

from .dense import dense_to_lora
from .dit_paper import export_dit_file, import_dit_file
from .format import BaseIdentity, Diff, ZooError
from .peft import export_peft, import_peft
from .store import Zoo

__all__ = ["BaseIdentity", "Diff", "Zoo", "ZooError", "dense_to_lora", "export_dit_file", "export_peft",
           "import_dit_file", "import_peft"]
