// session.cpp — the session core of the embeddable runtime, the same logic as the Python runtime's
// g4c/runtime/session.py: the artifact check, weights memory-mapped and handed to the executor, KV
// caches sized from the plan (rings of window + chunk - 1 rows for sliding producers, max_context rows
// for global ones), PLE rows gathered from the mapped host table, chunked prefill, decode, sampling.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <numeric>
#include <sstream>

#include "g4c.h"
#include "internal.h"

namespace g4c {

static thread_local std::string last_error;
constexpr size_t kAlignment = 64;  // TVM kernels assume 64-byte aligned buffers

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}

static std::string join(const std::string &dir, const std::string &name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

// a read-only private mapping of a whole file (weights are used in place, pages shared with the cache)
class MappedFile {
 public:
  MappedFile(const std::string &path, uint64_t expected_size) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(G4C_ERR_ARTIFACT, "artifact file " + path + " is missing: " + std::strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) != expected_size) {
      ::close(fd);
      throw Error(G4C_ERR_ARTIFACT, "artifact file " + path + " is corrupt or was modified (size " +
                                        std::to_string(st.st_size) + ", expected " + std::to_string(expected_size) + ")");
    }
    size_ = expected_size;
    data_ = size_ ? mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    ::close(fd);
    if (data_ == MAP_FAILED) throw Error(G4C_ERR_MEMORY, "cannot map " + path + ": " + std::strerror(errno));
  }
  ~MappedFile() {
    if (data_ && data_ != MAP_FAILED) munmap(data_, size_);
  }
  MappedFile(const MappedFile &) = delete;
  MappedFile &operator=(const MappedFile &) = delete;
  const uint8_t *at(uint64_t offset) const { return static_cast<const uint8_t *>(data_) + offset; }

 private:
  std::string path_;
  void *data_ = nullptr;
  uint64_t size_ = 0;
};

struct AlignedFree {
  void operator()(void *p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<uint8_t, AlignedFree>;

static AlignedBuffer aligned_copy(const void *src, size_t nbytes) {
  void *p = std::aligned_alloc(kAlignment, (nbytes + kAlignment - 1) / kAlignment * kAlignment);
  if (!p) throw std::bad_alloc();
  std::memcpy(p, src, nbytes);
  return AlignedBuffer(static_cast<uint8_t *>(p));
}

static float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400)) { mantissa <<= 1; --exponent; }
      bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// one row of the PLE table as float32: stored floats converted, q8/q4/q3 blocks (g4c/quant.py) dequantized
static void host_row(const HostTableInfo &t, const MappedFile &file, uint64_t start, int64_t row, float *out) {
  const int64_t width = t.bits ? t.scales.shape[1] * 32 : t.data.shape[1];
  const uint64_t row_bytes = static_cast<uint64_t>(t.data.shape[1]) * dtype_size(t.data.dtype);
  const uint8_t *data = file.at(start + t.data.begin + row * row_bytes);
  if (t.bits == 0) {
    for (int64_t i = 0; i < width; ++i) {
      uint16_t h;
      switch (t.data.dtype) {
        case DType::F32: std::memcpy(&out[i], data + 4 * i, 4); break;
        case DType::F16: std::memcpy(&h, data + 2 * i, 2); out[i] = half_to_float(h); break;
        default: std::memcpy(&h, data + 2 * i, 2); out[i] = bf16_to_float(h); break;
      }
    }
    return;
  }
  const int64_t groups = width / 32;
  const uint64_t scale_bytes = dtype_size(t.scales.dtype);
  const uint8_t *scales = file.at(start + t.scales.begin + row * groups * scale_bytes);
  const int group_bytes = 32 * t.bits / 8;
  for (int64_t g = 0; g < groups; ++g) {
    float scale;
    if (t.scales.dtype == DType::F16) {
      uint16_t h;
      std::memcpy(&h, scales + 2 * g, 2);
      scale = half_to_float(h);
    } else {
      std::memcpy(&scale, scales + 4 * g, 4);
    }
    const uint8_t *b = data + g * group_bytes;
    float *o = out + g * 32;
    for (int e = 0; e < 32; ++e) {
      int q;
      if (t.bits == 8) {
        q = static_cast<int8_t>(b[e]);
      } else if (t.bits == 4) {  // byte e holds value e (low nibble) and value e + 16 (high nibble)
        q = (e < 16 ? (b[e] & 15) : (b[e - 16] >> 4)) - 8;
      } else {  // q3: value e in bits 3e..3e+2 of the group's 12 bytes, least significant first
        int v = 0;
        for (int k = 0; k < 3; ++k) v |= ((b[(3 * e + k) / 8] >> ((3 * e + k) % 8)) & 1) << k;
        q = v - 4;
      }
      o[e] = static_cast<float>(q) * scale;
    }
  }
}

// the SHA-256 hex digest of the manifest, and its "target" value (to name a foreign artifact)
static std::string manifest_target(const std::string &path) {
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string key = "\"target\": \"";
  size_t at = text.find(key);
  if (at == std::string::npos) return "";
  size_t end = text.find('"', at + key.size());
  return end == std::string::npos ? "" : text.substr(at + key.size(), std::min<size_t>(end - at - key.size(), 64));
}

static void check_artifact(const std::string &dir, bool verify) {
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw Error(G4C_ERR_ARTIFACT, dir + ": no such artifact directory");
  const std::string manifest = join(dir, "manifest.json");
  if (stat(manifest.c_str(), &st) != 0) throw Error(G4C_ERR_ARTIFACT, dir + " is not a g4c artifact (no manifest.json)");
  uint64_t size = 0;
  if (sha256_file(manifest, &size) != kModel.manifest_sha256) {
    std::string target = manifest_target(manifest);
    const std::string what = target.empty() ? std::string("its manifest is unreadable")
                             : target == kModel.target ? "another " + target + " artifact"
                                                       : "its manifest is for target " + target + ", this libg4c.so for a " +
                                                             kModel.target + " artifact";
    throw Error(G4C_ERR_ARTIFACT, dir + " is not the artifact this library was generated for (" + what +
                                      "): link the lib/libg4c.so inside the artifact you open");
  }
  for (int i = 0; i < kModel.n_files; ++i) {
    const FileInfo &f = kModel.files[i];
    const std::string path = join(dir, f.name);
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) throw Error(G4C_ERR_ARTIFACT, "artifact file " + std::string(f.name) + " is missing");
    bool ok = static_cast<uint64_t>(st.st_size) == f.size;
    if (ok && verify) ok = sha256_file(path, &size) == f.sha256;
    if (!ok) throw Error(G4C_ERR_ARTIFACT, "artifact file " + std::string(f.name) + " is corrupt or was modified (SHA-256 mismatch)");
  }
}

static uint64_t file_size(const char *name) {
  for (int i = 0; i < kModel.n_files; ++i)
    if (std::strcmp(kModel.files[i].name, name) == 0) return kModel.files[i].size;
  return 0;
}

}  // namespace g4c

using namespace g4c;

namespace g4c {

// a program's inputs as the executor takes them: integers converted to the artifact's index dtype (owned
// here), floats borrowed from the caller or owned here
class InputSet {
 public:
  void index(const std::vector<int64_t> &values, std::vector<int64_t> shape) {
    const DType dtype = kModel.index_bits == 32 ? DType::I32 : DType::I64;
    std::vector<uint8_t> bytes(values.size() * dtype_size(dtype));
    if (dtype == DType::I32) {
      for (size_t i = 0; i < values.size(); ++i) {
        const int32_t v = static_cast<int32_t>(values[i]);
        std::memcpy(bytes.data() + 4 * i, &v, 4);
      }
    } else if (!values.empty()) {
      std::memcpy(bytes.data(), values.data(), bytes.size());
    }
    storage_.push_back(std::move(bytes));  // moving a vector keeps its buffer: earlier pointers stay valid
    tensors.push_back({storage_.back().data(), dtype, std::move(shape), storage_.back().size()});
  }
  void floats(const float *data, std::vector<int64_t> shape) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    tensors.push_back({data, DType::F32, std::move(shape), n * 4});
  }
  // the tensors in the program's input order, each made by make(name) into this set
  template <typename Make>
  static std::vector<HostTensor> ordered(const ProgramInfo &p, InputSet &set, Make &&make) {
    std::vector<HostTensor> out;
    for (int i = 0; i < p.ninputs; ++i) {
      set.tensors.clear();
      make(std::string(p.inputs[i].name));
      if (set.tensors.size() != 1)
        throw Error(G4C_ERR_ARTIFACT, std::string("this runtime cannot make input ") + p.inputs[i].name + " of " + p.name);
      out.push_back(set.tensors.front());
    }
    return out;
  }
  std::vector<HostTensor> tensors;

 private:
  std::vector<std::vector<uint8_t>> storage_;
};

std::vector<int64_t> arange(int64_t start, int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

}  // namespace g4c

struct g4c_session {
  g4c_options options;
  int max_context = 0, position = 0;
  std::unique_ptr<MappedFile> weights_file, host_file;
  std::vector<AlignedBuffer> copies;  // weights whose file offset is not 64-byte aligned
  std::unique_ptr<Executor> executor;
  std::vector<std::array<int64_t, 3>> cache_shapes;
  std::vector<float> ple;

  void open(const std::string &dir) {
    check_artifact(dir, options.verify != 0);
    std::vector<HostTensor> weights;
    if (kModel.weights_data_start) {
      weights_file = std::make_unique<MappedFile>(join(dir, "weights.safetensors"), file_size("weights.safetensors"));
      for (int i = 0; i < kModel.n_weights; ++i) {
        const TensorInfo &t = kModel.weights[i];
        const uint8_t *p = weights_file->at(kModel.weights_data_start + t.begin);
        const size_t nbytes = t.end - t.begin;
        if (reinterpret_cast<uintptr_t>(p) % kAlignment) {
          copies.push_back(aligned_copy(p, nbytes));
          p = copies.back().get();
        }
        weights.push_back({p, t.dtype, std::vector<int64_t>(t.shape, t.shape + t.ndim), nbytes});
      }
    }
    if (kModel.has_ple) host_file = std::make_unique<MappedFile>(join(dir, "host.safetensors"), file_size("host.safetensors"));
    executor = make_executor({dir, options.n_threads});
    executor->upload_weights(weights);
    // an image block is never split across chunks: the rings hold the longest chunk it can make
    const int ring_chunk = std::max(options.prefill_chunk, kModel.media.image ? kModel.media.max_soft_tokens : 0);
    for (int i = 0; i < kModel.n_slots; ++i) {
      const SlotInfo &s = kModel.slots[i];
      cache_shapes.push_back({s.window ? s.window + ring_chunk - 1 : max_context, s.kv_heads, s.head_dim});
    }
    executor->allocate_caches(cache_shapes);
    reset();
  }

  void reset() {
    executor->clear_caches();
    position = 0;
  }

  void check_tokens(const int32_t *ids, int n) const {
    if (n <= 0) throw Error(G4C_ERR_ARGUMENT, "need at least one token id");
    for (int i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= kModel.vocab_size)
        throw Error(G4C_ERR_TOKEN, "token id " + std::to_string(ids[i]) + " is outside the vocabulary (0.." +
                                       std::to_string(kModel.vocab_size - 1) + ")");
    if (static_cast<int64_t>(position) + n > max_context)
      throw Error(G4C_ERR_CONTEXT, "context of " + std::to_string(static_cast<int64_t>(position) + n) +
                                       " tokens exceeds the session's maximum (" + std::to_string(max_context) + ")");
  }

  // the program, or why this artifact / runtime cannot run it
  static const ProgramInfo &program_info(int program) {
    static const char *const kWhat[] = {"prefill", "prefill", "decode", "media prefill", "media prefill",
                                        "image encoder", "audio encoder"};
    if (!kModel.programs[program])
      throw Error(G4C_ERR_ARGUMENT, std::string(kModel.media.present ? "this artifact has no " : "this model is text-only: it has no ") +
                                        kWhat[program]);
    if (kModel.unsupported[program]) throw Error(G4C_ERR_ARTIFACT, kModel.unsupported[program]);
    return *kModel.programs[program];
  }

  // run one program on `n` ids after the cached ones; logits of the last row into `logits`
  void run(int program, const int32_t *ids, int n, float *logits) {
    const ProgramInfo &p = program_info(program);
    InputSet set;
    auto inputs = InputSet::ordered(p, set, [&](const std::string &name) {
      if (name == "ids") set.index(std::vector<int64_t>(ids, ids + n), {n});
      if (name == "positions") set.index(arange(position, n), {n});
    });
    execute(program, std::move(inputs), ids, n, logits, kModel.vocab_size, false);
    position += n;
  }

  // run a program: its inputs, the PLE rows of `ids` (programs that take them), every cache; the last
  // `floats` floats of its output (`whole`: all of it, exactly that many) into `out`
  void execute(int program, std::vector<HostTensor> inputs, const int32_t *ids, int n, float *out, size_t floats,
               bool whole) {
    const ProgramInfo &p = program_info(program);
    RunInputs in{program, std::move(inputs), n, nullptr, {}, out, floats, whole};
    if (kModel.has_ple && p.rows) {
      const HostTableInfo &t = kModel.host;
      const int64_t row = kModel.ple_width;
      ple.resize(static_cast<size_t>(n) * row);
      for (int i = 0; i < n; ++i) host_row(t, *host_file, kModel.host_data_start, ids[i], ple.data() + i * row);
      in.ple_rows = ple.data();
    }
    const bool encoder = program == ENCODE_IMAGE || program == ENCODE_AUDIO;  // caches passed, not used
    const bool fixed = program == DECODE && kModel.static_decode;  // fixed shapes: caches passed whole
    const int64_t length = static_cast<int64_t>(position) + n;
    for (int i = 0; i < kModel.n_slots; ++i)
      in.cache_rows.push_back(encoder || fixed || kModel.slots[i].window ? cache_shapes[i][0] : length);
    executor->run(in);
    for (size_t i = 0; i < floats; ++i)
      if (!std::isfinite(out[i]))
        throw Error(G4C_ERR_DEVICE, std::string("the compiled model produced non-finite ") +
                                        (encoder ? (program == ENCODE_IMAGE ? "image embeddings" : "audio embeddings")
                                                 : "logits") +
                                        " in " + p.name + " (NaN/Inf weights, or a damaged artifact)");
  }

  // -- images and audio (g4c/runtime/media.py) -----------------------------------------------------

  // encode_image on one image: the inputs image_encoder_inputs makes, the pooling of g4c/media.py
  // pool_index (from the positions, as transformers groups patches by them)
  void encode_image(const float *pixel_values, const int32_t *xy, int n, float *rows_out, int max_rows, int *n_rows) {
    const MediaInfo &m = kModel.media;
    const ProgramInfo &p = program_info(ENCODE_IMAGE);
    const int k = m.pooling_kernel_size, kk = k * k, max_patches = m.max_soft_tokens * kk;
    if (n <= 0) throw Error(G4C_ERR_ARGUMENT, "g4c_encode_image: need at least one patch");
    if (n > max_patches)
      throw Error(G4C_ERR_ARGUMENT, "g4c_encode_image: " + std::to_string(n) + " patches, over this model's " +
                                        std::to_string(max_patches) + " (max_soft_tokens " + std::to_string(m.max_soft_tokens) +
                                        " × " + std::to_string(kk) + ")");
    int width = 0, height = 0;
    for (int i = 0; i < n; ++i) {
      const int32_t x = xy[2 * i], y = xy[2 * i + 1];
      if (x < 0 || y < 0 || x >= max_patches || y >= max_patches)
        throw Error(G4C_ERR_ARGUMENT, "g4c_encode_image: patch " + std::to_string(i) + " has position (" + std::to_string(x) +
                                          ", " + std::to_string(y) + ")" +
                                          (x < 0 || y < 0 ? ": leave the processor's padding rows out" : ""));
      width = std::max(width, x + 1);
      height = std::max(height, y + 1);
    }
    if (width % k || height % k || static_cast<int64_t>(width) * height != n)
      throw Error(G4C_ERR_ARGUMENT, "g4c_encode_image: the " + std::to_string(n) + " positions span " + std::to_string(width) +
                                        "x" + std::to_string(height) + " patches; an image is a full grid of patches, " +
                                        "each side a multiple of the pooling kernel (" + std::to_string(k) + ")");
    const int soft = n / kk, grid = width / k;
    std::vector<int64_t> pool(static_cast<size_t>(n), -1), positions(2 * static_cast<size_t>(n)), xs(n), ys(n);
    for (int i = 0; i < n; ++i) {
      const int32_t x = xy[2 * i], y = xy[2 * i + 1];
      int64_t &slot = pool[static_cast<size_t>((x / k + grid * (y / k)) * kk + (y % k) * k + x % k)];
      if (slot >= 0)
        throw Error(G4C_ERR_ARGUMENT, "g4c_encode_image: patches " + std::to_string(slot) + " and " + std::to_string(i) +
                                          " have the same position (" + std::to_string(x) + ", " + std::to_string(y) + ")");
      slot = i;
      positions[2 * i] = xs[i] = x;
      positions[2 * i + 1] = ys[i] = y;
    }
    if (n_rows) *n_rows = soft;
    if (soft > max_rows)
      throw Error(G4C_ERR_ARGUMENT, "g4c_encode_image: the image has " + std::to_string(soft) +
                                        " soft tokens, rows_out holds " + std::to_string(max_rows));
    int64_t row = 0;  // floats per pixel_values row: the encoder's patches input [T, 3·p·p]
    for (int i = 0; i < p.ninputs; ++i)
      if (std::strcmp(p.inputs[i].name, "patches") == 0) row = p.inputs[i].shape[1];
    if (row != 3LL * m.patch_size * m.patch_size)
      throw Error(G4C_ERR_ARTIFACT, "the image encoder takes patches of " + std::to_string(row) + " floats, the processor's " +
                                        std::to_string(m.patch_size) + "-pixel patches have " +
                                        std::to_string(3 * m.patch_size * m.patch_size));
    std::vector<float> patches(static_cast<size_t>(n) * row);
    for (size_t i = 0; i < patches.size(); ++i) patches[i] = 2.0f * (pixel_values[i] - 0.5f);  // fp32, as transformers
    InputSet set;
    auto inputs = InputSet::ordered(p, set, [&](const std::string &name) {
      if (name == "patches") set.floats(patches.data(), {n, row});
      if (name == "patch_positions") set.index(positions, {n, 2});
      if (name == "patch_x") set.index(xs, {n});
      if (name == "patch_y") set.index(ys, {n});
      if (name == "positions") set.index(arange(0, n), {n});
      if (name == "reach") set.index(std::vector<int64_t>(static_cast<size_t>(n), n - 1), {n});
      if (name == "pool") set.index(pool, {soft, kk});
    });
    execute(ENCODE_IMAGE, std::move(inputs), nullptr, n, rows_out, static_cast<size_t>(soft) * kModel.hidden_size, true);
  }

  // encode_audio on one clip's valid frames: audio_feature_inputs (two ranges carry the lengths after
  // each stride-2 convolution)
  void encode_audio(const float *features, int n, float *rows_out, int max_rows, int *n_rows) {
    const MediaInfo &m = kModel.media;
    const ProgramInfo &p = program_info(ENCODE_AUDIO);
    if (n <= 0) throw Error(G4C_ERR_ARGUMENT, "g4c_encode_audio: need at least one frame");
    auto conv_out = [](int64_t size) { return (size + 2 - 3) / 2 + 1; };  // kernel 3, stride 2, padding 1
    const int64_t t1 = conv_out(n), soft = conv_out(t1);
    if (n_rows) *n_rows = static_cast<int>(soft);
    if (soft > m.audio_seq_length)
      throw Error(G4C_ERR_ARGUMENT, "g4c_encode_audio: " + std::to_string(n) + " frames make " + std::to_string(soft) +
                                        " soft tokens, over this model's " + std::to_string(m.audio_seq_length) + " per clip");
    if (soft > max_rows)
      throw Error(G4C_ERR_ARGUMENT, "g4c_encode_audio: the clip has " + std::to_string(soft) +
                                        " soft tokens, rows_out holds " + std::to_string(max_rows));
    int64_t mels = 0;
    for (int i = 0; i < p.ninputs; ++i)
      if (std::strcmp(p.inputs[i].name, "features") == 0) mels = p.inputs[i].shape[1];
    InputSet set;
    auto inputs = InputSet::ordered(p, set, [&](const std::string &name) {
      if (name == "features") set.floats(features, {n, mels});
      if (name == "conv0_frames") set.index(arange(0, t1), {t1});
      if (name == "frames") set.index(arange(0, soft), {soft});
    });
    execute(ENCODE_AUDIO, std::move(inputs), nullptr, n, rows_out, static_cast<size_t>(soft) * kModel.hidden_size, true);
  }

  // a prompt with soft tokens (g4c/runtime/media.py build_prompt and MediaPrompt.chunks, from an expanded
  // prompt): the pad token at soft positions, reach per token, chunks that never split an image block
  void prefill_media(const int32_t *ids, int n, const float *soft_rows, const uint8_t *soft_mask, float *logits) {
    const MediaInfo &m = kModel.media;
    if (!m.present)
      throw Error(G4C_ERR_ARGUMENT, "this model is text-only (its checkpoint has no vision or audio encoder): it takes no "
                                    "images or audio");
    const ProgramInfo &p = program_info(PREFILL_MEDIA);
    check_tokens(ids, n);
    const int hidden = kModel.hidden_size;
    std::vector<uint8_t> mask(static_cast<size_t>(n));
    std::vector<std::pair<int, int>> blocks;  // (start, length) of each run of image tokens
    for (int i = 0; i < n; ++i) {
      const bool image = m.image_token >= 0 && ids[i] == m.image_token, audio = m.audio_token >= 0 && ids[i] == m.audio_token;
      if ((image && !m.image) || (audio && !m.audio))
        throw Error(G4C_ERR_ARGUMENT, std::string("this artifact has no ") + (image ? "image" : "audio") +
                                          " encoder: its prompts hold no " + (image ? "image" : "audio") + " tokens (id " +
                                          std::to_string(ids[i]) + " at " + std::to_string(i) + ")");
      mask[i] = image || audio;
      if (soft_mask && (soft_mask[i] != 0) != (mask[i] != 0))
        throw Error(G4C_ERR_ARGUMENT, "g4c_prefill_media: soft_mask[" + std::to_string(i) + "] is " +
                                          std::to_string(soft_mask[i]) + " but ids[" + std::to_string(i) + "] (" +
                                          std::to_string(ids[i]) + ") is " + (mask[i] ? "" : "not ") +
                                          "an image/audio token");
      if (image && (blocks.empty() || blocks.back().first + blocks.back().second != i)) blocks.push_back({i, 0});
      if (image) ++blocks.back().second;
    }
    for (const auto &b : blocks)
      if (b.second > m.max_soft_tokens)
        throw Error(G4C_ERR_ARGUMENT, "g4c_prefill_media: " + std::to_string(b.second) + " image tokens in a row at " +
                                          std::to_string(b.first) + ", over this model's " + std::to_string(m.max_soft_tokens) +
                                          " per image (boi/eoi separate images)");
    if (!soft_rows && std::find(mask.begin(), mask.end(), 1) != mask.end())
      throw Error(G4C_ERR_ARGUMENT, "g4c_prefill_media: soft_rows is NULL but the prompt has image/audio tokens");
    std::vector<int32_t> llm_ids(ids, ids + n);
    std::vector<int64_t> reach = arange(0, n);
    for (int i = 0; i < n; ++i)
      if (mask[i]) llm_ids[i] = m.pad_token;  // transformers' llm_input_ids: the PLE reads the pad token there
    if (m.bidirectional_vision)
      for (const auto &b : blocks) std::fill(reach.begin() + b.first, reach.begin() + b.first + b.second, b.first + b.second - 1);
    const int base = position, size = options.prefill_chunk;
    for (int start = 0; start < n;) {
      int end = std::min(start + size, n);
      for (const auto &b : blocks) {  // the chunk would cut this block: end before it, or after it when it starts here
        const int b0 = b.first, b1 = b.first + b.second;
        if (b0 < end && end < b1) end = b0 > start ? b0 : b1;
      }
      const int count = end - start;
      std::vector<float> soft(static_cast<size_t>(count) * hidden, 0.0f);  // the encoders' rows, 0 elsewhere
      std::vector<int64_t> chunk_mask(mask.begin() + start, mask.begin() + end), chunk_reach(count);
      for (int i = 0; i < count; ++i) {
        if (mask[start + i]) std::memcpy(&soft[static_cast<size_t>(i) * hidden], soft_rows + static_cast<size_t>(start + i) * hidden, 4 * hidden);
        chunk_reach[i] = reach[start + i] + base;
      }
      InputSet set;
      auto inputs = InputSet::ordered(p, set, [&](const std::string &name) {
        if (name == "ids") set.index(std::vector<int64_t>(llm_ids.begin() + start, llm_ids.begin() + end), {count});
        if (name == "positions") set.index(arange(position, count), {count});
        if (name == "soft") set.floats(soft.data(), {count, hidden});
        if (name == "soft_mask") set.index(chunk_mask, {count});
        if (name == "reach") set.index(chunk_reach, {count});
      });
      execute(PREFILL_MEDIA, std::move(inputs), llm_ids.data() + start, count, logits, kModel.vocab_size, false);
      position += count;
      start = end;
    }
  }
};

namespace {

template <typename F>
int guarded(F &&body) {
  try {
    body();
    return G4C_OK;
  } catch (const Error &e) {
    last_error = e.what();
    return e.code;
  } catch (const std::bad_alloc &) {
    last_error = "out of memory";
    return G4C_ERR_MEMORY;
  } catch (const std::exception &e) {  // a TVM/wgpu failure inside the artifact: its last line
    std::string message = e.what();
    while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
    size_t nl = message.rfind('\n');
    last_error = "the compiled model failed: " + (nl == std::string::npos ? message : message.substr(nl + 1));
    return G4C_ERR_DEVICE;
  } catch (...) {
    last_error = "the compiled model failed (unknown exception)";
    return G4C_ERR_DEVICE;
  }
}

void require(bool ok, const char *what) {
  if (!ok) throw Error(G4C_ERR_ARGUMENT, what);
}

uint64_t next_random(uint64_t *state) {  // splitmix64
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

extern "C" {

const char *g4c_version(void) {
  static const std::string version = std::string("g4c ") + kModel.g4c_version + " (api " + std::to_string(G4C_API_VERSION) + ")";
  return version.c_str();
}

g4c_options g4c_default_options(void) { return g4c_options{0, 0, 64, 1}; }
g4c_sampler g4c_default_sampler(void) { return g4c_sampler{0.0f, 0, 1.0f, 0}; }
const char *g4c_last_error(void) { return last_error.c_str(); }

int g4c_open(const char *artifact_dir, g4c_session **out) {
  g4c_options options = g4c_default_options();
  return g4c_open_with(artifact_dir, &options, out);
}

int g4c_open_with(const char *artifact_dir, const g4c_options *options, g4c_session **out) {
  return guarded([&] {
    require(out != nullptr, "g4c_open: out is NULL");
    *out = nullptr;
    require(artifact_dir != nullptr, "g4c_open: artifact_dir is NULL");
    require(options != nullptr, "g4c_open: options is NULL");
    require(options->n_threads >= 0 && options->max_context >= 0 && options->prefill_chunk >= 0,
            "g4c_open: options must be >= 0");
    auto session = std::make_unique<g4c_session>();
    session->options = *options;
    if (session->options.prefill_chunk == 0) session->options.prefill_chunk = 64;
    const int wanted = options->max_context ? options->max_context : kModel.default_max_context;
    session->max_context = std::min(wanted, kModel.max_positions);
    session->open(artifact_dir);
    *out = session.release();
  });
}

int g4c_vocab_size(const g4c_session *s) { return s ? kModel.vocab_size : 0; }
int g4c_max_context(const g4c_session *s) { return s ? s->max_context : 0; }
int g4c_position(const g4c_session *s) { return s ? s->position : 0; }

int g4c_prefill(g4c_session *s, const int32_t *ids, int n_ids, float *logits) {
  return guarded([&] {
    require(s != nullptr && ids != nullptr && logits != nullptr, "g4c_prefill: NULL argument");
    s->check_tokens(ids, n_ids);
    for (int start = 0; start < n_ids; start += s->options.prefill_chunk)
      s->run(PREFILL, ids + start, std::min(s->options.prefill_chunk, n_ids - start), logits);
  });
}

int g4c_decode(g4c_session *s, int32_t id, float *logits) {
  return guarded([&] {
    require(s != nullptr && logits != nullptr, "g4c_decode: NULL argument");
    s->check_tokens(&id, 1);
    s->run(DECODE, &id, 1, logits);
  });
}

void g4c_reset(g4c_session *s) {
  if (s) guarded([&] { s->reset(); });
}

void g4c_close(g4c_session *s) { delete s; }

int32_t g4c_argmax(const float *logits, int n) {
  if (!logits || n <= 0) return -1;
  return static_cast<int32_t>(std::max_element(logits, logits + n) - logits);  // the first maximum, as numpy
}

int g4c_sample(const g4c_sampler *sampler, const float *logits, int n, uint64_t *rng_state, int32_t *out) {
  return guarded([&] {
    require(sampler && logits && rng_state && out && n > 0, "g4c_sample: NULL argument or empty logits");
    require(sampler->temperature >= 0 && sampler->top_k >= 0 && sampler->top_p > 0 && sampler->top_p <= 1,
            "g4c_sample: temperature >= 0, top_k >= 0 and 0 < top_p <= 1 required");
    if (sampler->temperature == 0) {
      *out = g4c_argmax(logits, n);
      return;
    }
    std::vector<int32_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    const int keep = sampler->top_k ? std::min(sampler->top_k, n) : n;
    std::vector<double> probs(keep);
    double sum = 0;
    for (int i = 0; i < keep; ++i)
      sum += probs[i] = std::exp((double(logits[order[i]]) - logits[order[0]]) / sampler->temperature);
    int cutoff = keep;
    if (sampler->top_p < 1) {  // smallest prefix whose mass reaches top_p (always >= 1 token)
      double mass = 0;
      for (cutoff = 0; cutoff < keep;) {
        mass += probs[cutoff++] / sum;
        if (mass >= sampler->top_p) break;
      }
    }
    double total = std::accumulate(probs.begin(), probs.begin() + cutoff, 0.0);
    double u = (next_random(rng_state) >> 11) * 0x1.0p-53 * total;
    for (int i = 0; i < cutoff; ++i) {
      if ((u -= probs[i]) < 0 || i == cutoff - 1) {
        *out = order[i];
        return;
      }
    }
  });
}

int g4c_hidden_size(const g4c_session *s) { return s ? kModel.hidden_size : 0; }

int g4c_get_media_info(const g4c_session *s, g4c_media_info *out) {
  return guarded([&] {
    require(s != nullptr && out != nullptr, "g4c_get_media_info: NULL argument");
    const MediaInfo &m = kModel.media;
    g4c_media_info info;
    std::memset(&info, 0, sizeof info);
    info.has_image = m.image;
    info.has_audio = m.audio;
    info.hidden_size = kModel.hidden_size;
    info.bidirectional_vision = m.bidirectional_vision;
    info.image_token_id = m.image_token;
    info.boi_token_id = m.boi_token;
    info.eoi_token_id = m.eoi_token;
    info.audio_token_id = m.audio_token;
    info.boa_token_id = m.boa_token;
    info.eoa_token_id = m.eoa_token;
    info.pad_token_id = m.pad_token;
    info.patch_size = m.patch_size;
    info.pooling_kernel_size = m.pooling_kernel_size;
    info.max_soft_tokens = m.max_soft_tokens;
    info.do_resize = m.do_resize;
    info.resample = m.resample;
    info.do_rescale = m.do_rescale;
    info.do_normalize = m.do_normalize;
    info.do_convert_rgb = m.do_convert_rgb;
    info.rescale_factor = m.rescale_factor;
    std::copy(m.image_mean, m.image_mean + 3, info.image_mean);
    std::copy(m.image_std, m.image_std + 3, info.image_std);
    info.sampling_rate = m.sampling_rate;
    info.n_mels = m.n_mels;
    info.frame_length = m.frame_length;
    info.hop_length = m.hop_length;
    info.fft_length = m.fft_length;
    info.max_length = m.max_length;
    info.min_frequency = m.min_frequency;
    info.max_frequency = m.max_frequency;
    info.mel_floor = m.mel_floor;
    info.audio_seq_length = m.audio_seq_length;
    *out = info;
  });
}

const char *g4c_processor_config(const g4c_session *s) { return s ? kModel.media.processor_json : "{}"; }

int g4c_encode_image(g4c_session *s, const float *pixel_values, const int32_t *patch_xy, int n_patches, float *rows_out,
                     int max_rows, int *n_rows) {
  if (n_rows) *n_rows = 0;
  return guarded([&] {
    require(s && pixel_values && patch_xy && rows_out && n_rows, "g4c_encode_image: NULL argument");
    s->encode_image(pixel_values, patch_xy, n_patches, rows_out, max_rows, n_rows);
  });
}

int g4c_encode_audio(g4c_session *s, const float *features, int n_frames, float *rows_out, int max_rows, int *n_rows) {
  if (n_rows) *n_rows = 0;
  return guarded([&] {
    require(s && features && rows_out && n_rows, "g4c_encode_audio: NULL argument");
    s->encode_audio(features, n_frames, rows_out, max_rows, n_rows);
  });
}

int g4c_prefill_media(g4c_session *s, const int32_t *ids, int n_ids, const float *soft_rows, const uint8_t *soft_mask,
                      float *logits) {
  return guarded([&] {
    require(s != nullptr && ids != nullptr && logits != nullptr, "g4c_prefill_media: NULL argument");
    s->prefill_media(ids, n_ids, soft_rows, soft_mask, logits);
  });
}

int g4c_is_eos(const g4c_session *s, int32_t id) {
  (void)s;
  return std::find(kModel.eos, kModel.eos + kModel.n_eos, id) != kModel.eos + kModel.n_eos;
}

int g4c_generate(g4c_session *s, const int32_t *ids, int n_ids, int max_new, const g4c_sampler *sampler,
                 g4c_token_callback on_token, void *user_data, int32_t *out, int *n_out) {
  if (n_out) *n_out = 0;
  int status = guarded([&] {
    require(s && ids && out && n_out, "g4c_generate: NULL argument");
    require(max_new >= 0, "g4c_generate: max_new must be >= 0");
  });
  if (status != G4C_OK || max_new == 0) return status;
  g4c_sampler greedy = g4c_default_sampler();
  const g4c_sampler *chosen = sampler ? sampler : &greedy;
  uint64_t rng = chosen->seed;
  std::vector<float> logits(kModel.vocab_size);
  if ((status = g4c_prefill(s, ids, n_ids, logits.data())) != G4C_OK) return status;
  for (;;) {
    int32_t token;
    if ((status = g4c_sample(chosen, logits.data(), kModel.vocab_size, &rng, &token)) != G4C_OK) return status;
    out[(*n_out)++] = token;
    if (on_token && on_token(token, user_data)) {
      last_error = "generation stopped by the token callback";
      return G4C_ERR_ABORTED;
    }
    if (g4c_is_eos(s, token) || *n_out == max_new) return G4C_OK;
    if (s->position >= s->max_context) {
      last_error = "the session's context is full (" + std::to_string(s->max_context) + " tokens)";
      return G4C_ERR_CONTEXT;
    }
    if ((status = g4c_decode(s, token, logits.data())) != G4C_OK) return status;
  }
}

}  // extern "C"
