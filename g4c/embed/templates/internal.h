// internal.h — what the generated model description (model.cpp) holds and what the session core
// (session.cpp) asks of an executor (vm_executor.cpp: TVM's Relax VM; wgpu_executor.cpp: WGSL kernels).
// Generated with the artifact by g4c; not part of the public API (see g4c.h).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace g4c {

enum class DType : uint8_t { F32, F16, BF16, I32, I64, U32, U8 };
size_t dtype_size(DType dtype);

// a tensor of an artifact file: byte offsets relative to the file's data section
struct TensorInfo {
  const char *name;
  DType dtype;
  int ndim;
  int64_t shape[4];
  uint64_t begin, end;
};

struct FileInfo {
  const char *name;
  const char *sha256;
  uint64_t size;
};

struct SlotInfo {
  const char *name;
  int kv_heads, head_dim;
  int window;  // ring of window + chunk - 1 rows; 0: a full cache of max_context rows
};

// the PLE table, gathered row by row on the host; bits 0: stored as `data.dtype`; 8/4/3: q8/q4/q3 blocks
struct HostTableInfo {
  int bits;
  TensorInfo data, scales;
};

// -- programs (wgpu: launch records written as code) -----------------------------------------------------
// A shape dimension: >= 0 a size; < 0 the symbol -(d + 1) of ModelInfo::symbols ("T": tokens or patches,
// "S": an encoder's soft tokens, ...), bound by the inputs of a run.
enum class RefKind : uint8_t { Input, Weight, Activation, Cache };
struct BufferRef {
  RefKind kind;
  int index;  // program input, weight, activation or cache slot index
};
enum class StepKind : uint8_t { Kernel, Rows, Last, Reshape };
struct Step {
  StepKind kind;
  int kernel;  // StepKind::Kernel: index into ModelInfo::kernels
  int nargs;
  const BufferRef *args;
};
struct ActivationInfo {  // an activation or a program input
  const char *name;
  DType dtype;
  int ndim;
  int64_t shape[4];  // < 0: a symbol (see BufferRef)
};
using GridFn = int64_t (*)(const int64_t *words);
struct LaunchInfo {
  int shader;  // index into ModelInfo::shaders
  int nbuffers;
  const int *buffers;  // binding i <- kernel parameter buffers[i]
  int nscalars;
  const int (*scalars)[2];  // uniform word j <- dimension [1] of parameter [0]
  GridFn grid_x, grid_y;
};
struct KernelInfo {
  int first_launch, nlaunches;
};
struct ProgramInfo {
  const char *name;
  int ninputs;
  const ActivationInfo *inputs;  // the runtime inputs in entry order (text programs: ids, positions)
  bool rows;                     // takes the PLE rows of its ids after the inputs
  int nsteps;
  const Step *steps;
  int nbuffers;
  const ActivationInfo *buffers;
  int output;  // activation index of the logits (an encoder: its embeddings)
};
struct ShaderInfo {
  const char *name;
  const char *wgsl;
};

enum Program { PREFILL = 0, PREFILL_ALL, DECODE, PREFILL_MEDIA, PREFILL_ALL_MEDIA, ENCODE_IMAGE, ENCODE_AUDIO, N_PROGRAMS };

// a multimodal artifact's media settings (g4c/runtime/media.py MediaSpec; the processor's numbers the
// runtime and the app's preprocessing need); present false: text only
struct MediaInfo {
  bool present, image, audio;  // the artifact has encode_image / encode_audio
  bool bidirectional_vision;   // an image's soft tokens attend to their whole block
  int32_t image_token, boi_token, eoi_token, audio_token, boa_token, eoa_token;  // -1: none
  int32_t pad_token;           // what the PLE reads at soft positions
  int patch_size, pooling_kernel_size, max_soft_tokens;  // image processor (0: no image section)
  int do_resize, resample, do_rescale, do_normalize, do_convert_rgb;
  double rescale_factor;
  float image_mean[3], image_std[3];
  int image_seq_length, audio_seq_length, audio_ms_per_token;
  int sampling_rate, n_mels, frame_length, hop_length, fft_length, max_length;  // feature extractor (0: none)
  float min_frequency, max_frequency, mel_floor;
  const char *processor_json;  // the whole processor config as JSON ("{}": none)
};

struct ModelInfo {
  const char *g4c_version;
  const char *target;
  const char *runtime;  // "relax-vm" | "wgpu"
  const char *library;  // the file the executor loads
  int n_loaded;
  const char *const *loaded;  // runtime libraries in lib/ loaded when a session opens (a GPU's module loader)
  const char *manifest_sha256;
  const char *device;
  int device_type;  // DLPack device type of the kernels
  int vocab_size, max_positions, default_max_context;
  int index_bits;  // 32 | 64: ids and positions
  bool has_ple, static_decode, needs_f16;
  int n_eos;
  const int32_t *eos;
  int n_files;
  const FileInfo *files;
  uint64_t weights_data_start;  // 0: no weight file
  int n_weights;
  const TensorInfo *weights;  // in the entry functions' order
  uint64_t host_data_start;
  HostTableInfo host;
  int64_t ple_width;  // floats per token of the PLE rows the programs take
  int n_slots;
  const SlotInfo *slots;
  int64_t max_binding;  // wgpu: the largest storage binding the profile allows
  int hidden_size;     // the text width: floats per soft-token row
  int n_symbols;
  const char *const *symbols;  // the symbolic dims of inputs and activations
  const ProgramInfo *programs[N_PROGRAMS];  // null: the artifact lacks it
  const char *unsupported[N_PROGRAMS];      // non-null: the program exists but this runtime cannot feed it (why)
  MediaInfo media;
  const KernelInfo *kernels;
  const LaunchInfo *launches;
  int n_shaders;
  const ShaderInfo *shaders;
};
extern const ModelInfo kModel;

// -- errors ------------------------------------------------------------------------------------------
struct Error : std::runtime_error {
  int code;
  Error(int code, const std::string &message) : std::runtime_error(message), code(code) {}
};

// -- executors ---------------------------------------------------------------------------------------
struct HostTensor {
  const void *data;
  DType dtype;
  std::vector<int64_t> shape;
  size_t nbytes;
};

struct RunInputs {
  int program;
  std::vector<HostTensor> inputs;       // ProgramInfo::inputs, in order (integers of index_bits)
  int count;                            // tokens: rows of the PLE rows
  const float *ple_rows;                // [count, width] or null
  std::vector<int64_t> cache_rows;      // rows of each cache the program sees
  float *logits;                        // out: the last `logits_floats` floats of the output
  size_t logits_floats;
  bool whole;                           // the output must have exactly logits_floats floats (an encoder)
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual void upload_weights(const std::vector<HostTensor> &weights) = 0;  // ModelInfo::weights order
  virtual void allocate_caches(const std::vector<std::array<int64_t, 3>> &shapes) = 0;
  virtual void clear_caches() = 0;
  virtual void run(const RunInputs &inputs) = 0;
};

struct ExecutorOptions {
  std::string directory;
  int n_threads;
};
std::unique_ptr<Executor> make_executor(const ExecutorOptions &options);

std::string sha256_file(const std::string &path, uint64_t *size);

}  // namespace g4c
