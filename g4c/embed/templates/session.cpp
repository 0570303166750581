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

struct g4c_session {
  g4c_options options;
  int max_context = 0, position = 0;
  std::unique_ptr<MappedFile> weights_file, host_file;
  std::vector<AlignedBuffer> copies;  // weights whose file offset is not 64-byte aligned
  std::unique_ptr<Executor> executor;
  std::vector<std::array<int64_t, 3>> cache_shapes;
  std::vector<int64_t> index_buffer;  // ids then positions, as index_bits ints
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
    for (int i = 0; i < kModel.n_slots; ++i) {
      const SlotInfo &s = kModel.slots[i];
      cache_shapes.push_back({s.window ? s.window + options.prefill_chunk - 1 : max_context, s.kv_heads, s.head_dim});
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

  // run one program on `n` ids after the cached ones; logits of the last row into `logits`
  void run(int program, const int32_t *ids, int n, float *logits) {
    const int length = position + n;
    const int width = kModel.index_bits / 8;
    index_buffer.resize(2 * static_cast<size_t>(n));
    auto *ids_out = reinterpret_cast<uint8_t *>(index_buffer.data());
    auto *positions_out = ids_out + static_cast<size_t>(n) * width;
    for (int i = 0; i < n; ++i) {
      int64_t id = ids[i], pos = position + i;
      if (width == 4) {
        int32_t a = static_cast<int32_t>(id), b = static_cast<int32_t>(pos);
        std::memcpy(ids_out + 4 * i, &a, 4);
        std::memcpy(positions_out + 4 * i, &b, 4);
      } else {
        std::memcpy(ids_out + 8 * i, &id, 8);
        std::memcpy(positions_out + 8 * i, &pos, 8);
      }
    }
    RunInputs in{program, n, ids_out, positions_out, nullptr, {}, logits, static_cast<size_t>(kModel.vocab_size)};
    if (kModel.has_ple) {
      const HostTableInfo &t = kModel.host;
      const int64_t row = kModel.ple_width;
      ple.resize(static_cast<size_t>(n) * row);
      for (int i = 0; i < n; ++i) host_row(t, *host_file, kModel.host_data_start, ids[i], ple.data() + i * row);
      in.ple_rows = ple.data();
    }
    const bool whole = program == DECODE && kModel.static_decode;  // fixed shapes: caches passed whole
    for (int i = 0; i < kModel.n_slots; ++i)
      in.cache_rows.push_back(whole || kModel.slots[i].window ? cache_shapes[i][0] : length);
    executor->run(in);
    for (int i = 0; i < kModel.vocab_size; ++i)
      if (!std::isfinite(logits[i]))
        throw Error(G4C_ERR_DEVICE, std::string("the compiled model produced non-finite logits in ") +
                                        kModel.programs[program] ->name + " (NaN/Inf weights, or a damaged artifact)");
    position = length;
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
