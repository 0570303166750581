"""g4c.targets — device targets (host llvm, CUDA, Metal, Vulkan, ARM) for the TVM codegen."""
