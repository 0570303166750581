"""`kernels.wgsl`: the WGSL of a wgpu artifact, one `// Function: NAME` section per device kernel
(TVM's WebGPU codegen writes it so); the launch records are in the manifest (`launches`)."""

from __future__ import annotations

SHADERS = "kernels.wgsl"


def split_source(source: str) -> dict[str, str]:
    """`kernels.wgsl` → {device kernel name: its WGSL module}."""
    sections: dict[str, str] = {}
    for chunk in source.split("// Function: ")[1:]:
        name, _, body = chunk.partition("\n")
        body = body.lstrip("/-\n")
        if body.strip():
            sections[name.strip()] = body
    return sections
