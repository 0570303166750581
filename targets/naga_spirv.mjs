// WGSL -> SPIR-V with naga (wgpu's shader translator, npm `naga-wasm`), the translation wgpu-native
// itself performs on Vulkan. Usage: node naga_spirv.mjs NAGA_WASM_DIR IN.wgsl OUT.spv [IN OUT ...]
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [nagaDir, ...files] = process.argv.slice(2);
const naga = await import(pathToFileURL(join(nagaDir, "dist", "node.js")).href);
for (let i = 0; i < files.length; i += 2) {
  const module = naga.parseWgsl(readFileSync(files[i], "utf8"));
  const info = naga.validate(module);
  const words = naga.writeSpirv(module, info, {});
  writeFileSync(files[i + 1], Buffer.from(words.buffer, words.byteOffset, words.byteLength));
  info.free();
  module.free();
}
