"""g4c.artifact — the compiled-artifact format, shared by the compiler (which writes it) and every
runtime (which reads it): the manifest dataclass, file names, weight recipes, tensor files, hashing.

numpy only: runtimes on devices import it without the compiler. The format is documented in
docs/artifact-format.md.
"""

from g4c.artifact.manifest import (FORMAT, FORMAT_VERSION, HOST, MANIFEST, WEIGHTS, EntrySignature, KVSlot,
                                   Manifest, Program, Step, is_artifact, read_manifest)
from g4c.artifact.shaders import SHADERS, split_source
from g4c.artifact.recipes import derived_shape, derived_weight, source_tensors
from g4c.artifact.tensors import (ALIGNMENT, ArtifactError, aligned, aligned_empty, read_aligned_safetensors,
                                  safetensors_layout, sha256_file, tensor_bytes, write_safetensors)

__all__ = ["ALIGNMENT", "FORMAT", "FORMAT_VERSION", "HOST", "MANIFEST", "SHADERS", "WEIGHTS", "ArtifactError", "EntrySignature",
           "KVSlot", "Manifest", "Program", "Step", "aligned", "aligned_empty", "derived_shape", "derived_weight",
           "is_artifact", "read_aligned_safetensors", "read_manifest", "safetensors_layout", "sha256_file", "source_tensors", "split_source", "tensor_bytes",
           "write_safetensors"]
