// wgpu_executor.cpp — runs a Vulkan artifact's WGSL kernels through wgpu-native's C API (webgpu.h,
// wgpu.h), as g4c/runtime/wgpu_executor.py does from Python: the weights are uploaded once, a compute
// pipeline is made once per distinct kernel, the KV caches live in device buffers the kernels update in
// place, and a program step (one prefill chunk, one decode token) is one command buffer: every launch of
// every kernel recorded in order, one submission, one read-back of the logits. Activation buffers are
// kept per (program, token count) and reused. The programs, launch records and WGSL come from model.cpp.
//
// wgpu reports validation and out-of-memory errors to the device's uncaptured-error callback (an
// unhandled one would abort the process): the callback keeps the first message and the call that caused
// it throws Error(G4C_ERR_DEVICE, ...) once wgpu returns.
#include <webgpu.h>
#include <wgpu.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <utility>

#include "g4c.h"
#include "internal.h"

namespace g4c {
namespace {

constexpr int64_t kMaxGroups = 65535;  // workgroups per grid dimension (WebGPU default limit)
const WGPUBufferUsage kStorage = WGPUBufferUsage_Storage | WGPUBufferUsage_CopySrc | WGPUBufferUsage_CopyDst;

// -- small helpers -------------------------------------------------------------------------------------

WGPUStringView view(const char *text) { return WGPUStringView{text, WGPU_STRLEN}; }

std::string text(WGPUStringView v) {
  if (!v.data) return "";
  return v.length == WGPU_STRLEN ? std::string(v.data) : std::string(v.data, v.length);
}

// the last non-empty line of a (multi-line) wgpu message: the most specific one, as the Python session
// reports it ("Validation Error / Caused by: / In wgpuDeviceCreateBindGroup / <what>"); a WGSL error
// ends with a source excerpt ("┌─ wgsl:1:1", the line, carets): the line before it says what is wrong
std::string last_line(const std::string &message) {
  std::istringstream lines(message);
  std::string line, last;
  while (std::getline(lines, line)) {
    const size_t begin = line.find_first_not_of(" \t\r"), end = line.find_last_not_of(" \t\r");
    if (begin == std::string::npos) continue;
    if (line.compare(begin, 3, "\xe2\x94\x8c") == 0) break;  // U+250C: the excerpt starts
    last = line.substr(begin, end - begin + 1);
  }
  return last.empty() ? "unknown wgpu error" : last;
}

uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

// an owned wgpu object: released (reference dropped) when the owner goes
template <typename T, void (*Release)(T)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(T h) : h_(h) {}
  Handle(Handle &&o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  Handle &operator=(Handle &&o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  Handle(const Handle &) = delete;
  Handle &operator=(const Handle &) = delete;
  ~Handle() { reset(); }
  void reset() {
    if (h_) Release(std::exchange(h_, nullptr));
  }
  T get() const { return h_; }
  explicit operator bool() const { return h_ != nullptr; }

 private:
  T h_ = nullptr;
};

using Adapter = Handle<WGPUAdapter, wgpuAdapterRelease>;
using Device = Handle<WGPUDevice, wgpuDeviceRelease>;
using Queue = Handle<WGPUQueue, wgpuQueueRelease>;
using Buffer = Handle<WGPUBuffer, wgpuBufferRelease>;
using Pipeline = Handle<WGPUComputePipeline, wgpuComputePipelineRelease>;
using Layout = Handle<WGPUBindGroupLayout, wgpuBindGroupLayoutRelease>;
using Module = Handle<WGPUShaderModule, wgpuShaderModuleRelease>;
using BindGroup = Handle<WGPUBindGroup, wgpuBindGroupRelease>;
using Encoder = Handle<WGPUCommandEncoder, wgpuCommandEncoderRelease>;
using Pass = Handle<WGPUComputePassEncoder, wgpuComputePassEncoderRelease>;
using Commands = Handle<WGPUCommandBuffer, wgpuCommandBufferRelease>;

// a buffer as a kernel parameter sees it: the shape it is bound with (a cache: the rows the program
// needs; a reshape: the output's shape over the input's buffer)
struct View {
  WGPUBuffer buffer;
  int ndim;
  int64_t shape[4];
  uint64_t itemsize;

  uint64_t numel() const {
    uint64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= static_cast<uint64_t>(shape[d]);
    return n;
  }
  uint64_t nbytes() const { return numel() * itemsize; }
};

// WGPU_BACKEND_TYPE (as the wgpu Python package reads it): force a backend, e.g. Vulkan on lavapipe
WGPUBackendType forced_backend() {
  const char *name = std::getenv("WGPU_BACKEND_TYPE");
  if (!name || !*name) return WGPUBackendType_Undefined;
  static const std::pair<const char *, WGPUBackendType> kBackends[] = {
      {"Null", WGPUBackendType_Null},     {"WebGPU", WGPUBackendType_WebGPU}, {"D3D11", WGPUBackendType_D3D11},
      {"D3D12", WGPUBackendType_D3D12},   {"Metal", WGPUBackendType_Metal},   {"Vulkan", WGPUBackendType_Vulkan},
      {"OpenGL", WGPUBackendType_OpenGL}, {"OpenGLES", WGPUBackendType_OpenGLES}};
  for (const auto &b : kBackends)
    if (std::strcmp(b.first, name) == 0) return b.second;
  return WGPUBackendType_Undefined;
}

// per (program, sizes of its symbolic dims): the activation buffers, the input buffers, their views
struct ProgramBuffers {
  std::vector<Buffer> owned;
  std::vector<View> activations, inputs;
};

// one WebGPU instance per process, made by the first session and kept: releasing the last instance
// unloads the Vulkan driver, which then has to be loaded (and its shaders' compiler initialised) again
// by the next session, and drivers leave allocations behind when unloaded
WGPUInstance shared_instance() {
  static WGPUInstance instance = wgpuCreateInstance(nullptr);
  if (!instance) throw Error(G4C_ERR_DEVICE, "cannot create a WebGPU instance (wgpu-native)");
  return instance;
}

class WgpuExecutor : public Executor {
 public:
  explicit WgpuExecutor(const ExecutorOptions &) : instance_(shared_instance()) { request_adapter(); }

  ~WgpuExecutor() override {
    // wait for the queue so no work in flight still uses what is released below (members then go in
    // reverse order: per-program buffers, pipelines, caches, weights, queue, device, adapter)
    if (device_) wgpuDevicePoll(device_.get(), true, nullptr);
  }

  void upload_weights(const std::vector<HostTensor> &weights) override {
    size_t largest = 0;
    for (const HostTensor &w : weights) largest = std::max(largest, w.nbytes);
    request_device(largest);
    for (const HostTensor &w : weights) weights_.push_back(buffer_with_data(w.data, w.nbytes, kStorage));
    check("uploading the weights");
    for (size_t i = 0; i < weights.size(); ++i) {
      View v{weights_[i].get(), static_cast<int>(weights[i].shape.size()), {0, 0, 0, 0}, dtype_size(weights[i].dtype)};
      std::copy(weights[i].shape.begin(), weights[i].shape.end(), v.shape);
      weight_views_.push_back(v);
    }
    for (int s = 0; s < kModel.n_shaders; ++s) make_pipeline(kModel.shaders[s]);
    uniforms_ = buffer(uniform_arena_size(), WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst);
    check("allocating the uniform buffer");
  }

  void allocate_caches(const std::vector<std::array<int64_t, 3>> &shapes) override {
    for (const auto &s : shapes) {
      caches_.push_back(buffer(std::max<uint64_t>(4, static_cast<uint64_t>(s[0] * s[1] * s[2]) * 4), kStorage));
      cache_shapes_.push_back(s);
    }
    check("allocating the KV caches");
  }

  void clear_caches() override {  // one submission for all caches
    Encoder encoder(wgpuDeviceCreateCommandEncoder(device_.get(), nullptr));
    for (const Buffer &c : caches_) wgpuCommandEncoderClearBuffer(encoder.get(), c.get(), 0, WGPU_WHOLE_SIZE);
    submit(std::move(encoder));
    check("clearing the KV caches");
  }

  void run(const RunInputs &in) override {
    try {
      record_and_read(in);
    } catch (const Error &e) {
      if (e.code != G4C_ERR_DEVICE || std::strncmp(e.what(), "wgpu: ", 6) != 0) throw;
      // as the Python session words a failure inside the artifact
      throw Error(G4C_ERR_DEVICE, std::string("the compiled model failed in ") + kModel.programs[in.program]->name +
                                      ": " + (e.what() + 6));
    }
  }

 private:
  // -- device --------------------------------------------------------------------------------------------

  void request_adapter() {
    WGPURequestAdapterOptions options = WGPU_REQUEST_ADAPTER_OPTIONS_INIT;
    options.powerPreference = WGPUPowerPreference_HighPerformance;
    options.backendType = forced_backend();
    struct Result {
      bool done = false;
      WGPUAdapter adapter = nullptr;
    } result;
    WGPURequestAdapterCallbackInfo callback = WGPU_REQUEST_ADAPTER_CALLBACK_INFO_INIT;
    callback.mode = WGPUCallbackMode_AllowProcessEvents;
    callback.callback = [](WGPURequestAdapterStatus status, WGPUAdapter adapter, WGPUStringView, void *user, void *) {
      auto *r = static_cast<Result *>(user);
      r->done = true;
      r->adapter = status == WGPURequestAdapterStatus_Success ? adapter : nullptr;
    };
    callback.userdata1 = &result;
    wgpuInstanceRequestAdapter(instance_, &options, callback);
    while (!result.done) wgpuInstanceProcessEvents(instance_);  // wgpu-native answers at once
    if (!result.adapter)
      throw Error(G4C_ERR_DEVICE, "no WebGPU/Vulkan adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)");
    adapter_ = Adapter(result.adapter);
  }

  std::string adapter_name() const {
    WGPUAdapterInfo info = WGPU_ADAPTER_INFO_INIT;
    if (wgpuAdapterGetInfo(adapter_.get(), &info) != WGPUStatus_Success) return "this device";
    std::string name = text(info.device);
    wgpuAdapterInfoFreeMembers(info);
    return name.empty() ? "this device" : name;
  }

  // the features and limits the Python runtime asks for: shader-f16 for fp16 weights, and the adapter's
  // own storage, buffer, workgroup limits (the WebGPU defaults are far below what the kernels need)
  void request_device(size_t largest_weight) {
    WGPULimits supported = WGPU_LIMITS_INIT;
    if (wgpuAdapterGetLimits(adapter_.get(), &supported) != WGPUStatus_Success)
      throw Error(G4C_ERR_DEVICE, "cannot read the limits of " + adapter_name());
    if (largest_weight > supported.maxStorageBufferBindingSize)
      throw Error(G4C_ERR_DEVICE, "a tensor of " + std::to_string(largest_weight) +
                                      " bytes exceeds this device's storage binding limit (" +
                                      std::to_string(supported.maxStorageBufferBindingSize) +
                                      "): compile for a profile with a smaller max_binding");
    std::vector<WGPUFeatureName> features;
    if (kModel.needs_f16) {
      if (!wgpuAdapterHasFeature(adapter_.get(), WGPUFeatureName_ShaderF16))
        throw Error(G4C_ERR_DEVICE, adapter_name() + " has no shader-f16: compile with --dtype float32");
      features.push_back(WGPUFeatureName_ShaderF16);
    }
    WGPULimits limits = WGPU_LIMITS_INIT;
    limits.maxStorageBufferBindingSize = supported.maxStorageBufferBindingSize;
    limits.maxBufferSize = supported.maxBufferSize;
    limits.maxStorageBuffersPerShaderStage = supported.maxStorageBuffersPerShaderStage;
    limits.maxComputeWorkgroupStorageSize = supported.maxComputeWorkgroupStorageSize;
    limits.maxComputeInvocationsPerWorkgroup = supported.maxComputeInvocationsPerWorkgroup;

    WGPUDeviceDescriptor descriptor = WGPU_DEVICE_DESCRIPTOR_INIT;
    descriptor.label = view("g4c");
    descriptor.requiredFeatureCount = features.size();
    descriptor.requiredFeatures = features.data();
    descriptor.requiredLimits = &limits;
    descriptor.uncapturedErrorCallbackInfo.callback = on_error;
    descriptor.uncapturedErrorCallbackInfo.userdata1 = this;
    descriptor.deviceLostCallbackInfo.mode = WGPUCallbackMode_AllowSpontaneous;
    descriptor.deviceLostCallbackInfo.callback = on_lost;
    descriptor.deviceLostCallbackInfo.userdata1 = this;

    struct Result {
      bool done = false;
      WGPUDevice device = nullptr;
      std::string message;
    } result;
    WGPURequestDeviceCallbackInfo callback = WGPU_REQUEST_DEVICE_CALLBACK_INFO_INIT;
    callback.mode = WGPUCallbackMode_AllowProcessEvents;
    callback.callback = [](WGPURequestDeviceStatus status, WGPUDevice device, WGPUStringView message, void *user, void *) {
      auto *r = static_cast<Result *>(user);
      r->done = true;
      r->device = status == WGPURequestDeviceStatus_Success ? device : nullptr;
      r->message = text(message);
    };
    callback.userdata1 = &result;
    wgpuAdapterRequestDevice(adapter_.get(), &descriptor, callback);
    while (!result.done) wgpuInstanceProcessEvents(instance_);
    if (!result.device)
      throw Error(G4C_ERR_DEVICE, "cannot open " + adapter_name() + ": " + last_line(result.message));
    device_ = Device(result.device);
    queue_ = Queue(wgpuDeviceGetQueue(device_.get()));
    WGPULimits granted = WGPU_LIMITS_INIT;
    wgpuDeviceGetLimits(device_.get(), &granted);
    uniform_align_ = std::max<uint64_t>(16, granted.minUniformBufferOffsetAlignment);
  }

  // called by wgpu inside the call that failed (or spontaneously for a lost device): keep the first
  // message for check() to throw; wgpu must not be called from here
  static void on_error(WGPUDevice const *, WGPUErrorType, WGPUStringView message, void *self, void *) {
    auto *e = static_cast<WgpuExecutor *>(self);
    if (e->error_.empty()) e->error_ = last_line(text(message));
  }

  static void on_lost(WGPUDevice const *, WGPUDeviceLostReason reason, WGPUStringView message, void *self, void *) {
    if (reason == WGPUDeviceLostReason_Destroyed || reason == WGPUDeviceLostReason_CallbackCancelled) return;
    auto *e = static_cast<WgpuExecutor *>(self);
    if (e->error_.empty()) e->error_ = "the device was lost: " + last_line(text(message));
  }

  void check(const std::string &what) {
    if (error_.empty()) return;
    std::string message = std::move(error_);
    error_.clear();
    throw Error(G4C_ERR_DEVICE, "wgpu: " + what + ": " + message);
  }

  // -- buffers and pipelines -----------------------------------------------------------------------------

  Buffer buffer(uint64_t size, WGPUBufferUsage usage, bool mapped = false) {
    WGPUBufferDescriptor descriptor = WGPU_BUFFER_DESCRIPTOR_INIT;
    descriptor.usage = usage;
    descriptor.size = size;
    descriptor.mappedAtCreation = mapped;
    return Buffer(wgpuDeviceCreateBuffer(device_.get(), &descriptor));
  }

  // as wgpu's create_buffer_with_data: mapped at creation, the size rounded up to a multiple of 4
  Buffer buffer_with_data(const void *data, size_t nbytes, WGPUBufferUsage usage) {
    const uint64_t size = align_up(std::max<size_t>(nbytes, 1), 4);
    Buffer b = buffer(size, usage, true);
    void *mapped = b ? wgpuBufferGetMappedRange(b.get(), 0, size) : nullptr;
    if (!mapped) {
      check("allocating a buffer of " + std::to_string(size) + " bytes");
      throw Error(G4C_ERR_DEVICE, "wgpu: cannot allocate a buffer of " + std::to_string(size) + " bytes");
    }
    std::memcpy(mapped, data, nbytes);
    std::memset(static_cast<uint8_t *>(mapped) + nbytes, 0, size - nbytes);
    wgpuBufferUnmap(b.get());
    return b;
  }

  void make_pipeline(const ShaderInfo &shader) {
    WGPUShaderSourceWGSL source = WGPU_SHADER_SOURCE_WGSL_INIT;
    source.code = view(shader.wgsl);
    WGPUShaderModuleDescriptor module_descriptor = WGPU_SHADER_MODULE_DESCRIPTOR_INIT;
    module_descriptor.nextInChain = &source.chain;
    module_descriptor.label = view(shader.name);
    Module module(wgpuDeviceCreateShaderModule(device_.get(), &module_descriptor));
    check(std::string("compiling kernel ") + shader.name);
    WGPUComputePipelineDescriptor descriptor = WGPU_COMPUTE_PIPELINE_DESCRIPTOR_INIT;
    descriptor.label = view(shader.name);
    descriptor.layout = nullptr;  // "auto": derived from the shader's bindings
    descriptor.compute.module = module.get();
    descriptor.compute.entryPoint = view(shader.name);
    Pipeline pipeline(wgpuDeviceCreateComputePipeline(device_.get(), &descriptor));
    check(std::string("creating the pipeline of kernel ") + shader.name);
    layouts_.emplace_back(wgpuComputePipelineGetBindGroupLayout(pipeline.get(), 0));
    pipelines_.push_back(std::move(pipeline));
  }

  // the uniform words of every launch of a run go into one buffer, a slot per launch at the device's
  // offset alignment: the largest a program can need, so one buffer serves every run
  static uint64_t slot_bytes(const LaunchInfo &launch, uint64_t align) {
    return align_up(align_up(4 * (static_cast<uint64_t>(launch.nscalars) + 1), 16), align);
  }

  uint64_t uniform_arena_size() const {
    uint64_t largest = 16;
    for (const ProgramInfo *p : kModel.programs) {
      if (!p) continue;
      uint64_t total = 0;
      for (int s = 0; s < p->nsteps; ++s) {
        if (p->steps[s].kind != StepKind::Kernel) continue;
        const KernelInfo &k = kModel.kernels[p->steps[s].kernel];
        for (int l = 0; l < k.nlaunches; ++l) total += slot_bytes(kModel.launches[k.first_launch + l], uniform_align_);
      }
      largest = std::max(largest, total);
    }
    return largest;
  }

  // the sizes of the symbolic dims (T, S, ...) this run's inputs bind (-1: unbound)
  static std::vector<int64_t> sizes_of(const RunInputs &in) {
    const ProgramInfo &p = *kModel.programs[in.program];
    std::vector<int64_t> sizes(kModel.n_symbols, -1);
    for (int i = 0; i < p.ninputs; ++i)
      for (int d = 0; d < p.inputs[i].ndim && d < static_cast<int>(in.inputs[i].shape.size()); ++d)
        if (p.inputs[i].shape[d] < 0) sizes[-p.inputs[i].shape[d] - 1] = in.inputs[i].shape[d];
    return sizes;
  }

  ProgramBuffers &program_buffers(const RunInputs &in) {
    auto key = std::make_pair(in.program, sizes_of(in));
    auto found = buffers_.find(key);
    if (found != buffers_.end()) return found->second;
    const std::vector<int64_t> &sizes = key.second;
    const ProgramInfo &p = *kModel.programs[in.program];
    ProgramBuffers made;
    for (int i = 0; i < p.nbuffers; ++i) {
      const ActivationInfo &a = p.buffers[i];
      View v{nullptr, a.ndim, {0, 0, 0, 0}, dtype_size(a.dtype)};
      for (int d = 0; d < a.ndim; ++d) {
        v.shape[d] = a.shape[d] < 0 ? sizes[-a.shape[d] - 1] : a.shape[d];
        if (v.shape[d] < 0)
          throw Error(G4C_ERR_DEVICE, std::string("no input of ") + p.name + " gives the size " + kModel.symbols[-a.shape[d] - 1]);
      }
      made.owned.push_back(buffer(std::max<uint64_t>(4, v.nbytes()), kStorage));
      v.buffer = made.owned.back().get();
      made.activations.push_back(v);
    }
    for (const HostTensor &t : in.inputs) {
      View v{nullptr, static_cast<int>(t.shape.size()), {0, 0, 0, 0}, dtype_size(t.dtype)};
      std::copy(t.shape.begin(), t.shape.end(), v.shape);
      made.owned.push_back(buffer(std::max<uint64_t>(4, align_up(t.nbytes, 4)), kStorage));
      v.buffer = made.owned.back().get();
      made.inputs.push_back(v);
    }
    check(std::string("allocating the buffers of ") + p.name);
    return buffers_.emplace(std::move(key), std::move(made)).first->second;
  }

  // -- a run ---------------------------------------------------------------------------------------------

  // what one run records: its views, the open compute pass, the uniform words and the bind groups
  struct Recording {
    const RunInputs &in;
    ProgramBuffers &buffers;
    std::vector<View> activations;  // the program's views, reshapes aliased in
    Encoder encoder;
    Pass pass;
    std::vector<uint8_t> uniforms;
    std::vector<BindGroup> groups;  // released once the submission is done
  };

  void record_and_read(const RunInputs &in) {
    ProgramBuffers &buffers = program_buffers(in);
    for (size_t i = 0; i < in.inputs.size(); ++i)  // whole words: an odd-sized input is written padded
      write_padded(buffers.inputs[i].buffer, in.inputs[i].data, in.inputs[i].nbytes);
    Recording r{in, buffers, buffers.activations, Encoder(wgpuDeviceCreateCommandEncoder(device_.get(), nullptr)), {}, {}, {}};
    const ProgramInfo &p = *kModel.programs[in.program];
    for (int s = 0; s < p.nsteps; ++s) step(r, p.steps[s]);
    end_pass(r);
    check("recording the kernels");
    const View &logits = r.activations[p.output];
    const uint64_t size = static_cast<uint64_t>(in.logits_floats) * 4;
    if (in.whole && logits.numel() * 4 != size)
      throw Error(G4C_ERR_DEVICE, "the compiled encoder returned " + std::to_string(logits.numel()) + " floats, not the " +
                                      std::to_string(in.logits_floats) + " of its soft tokens");
    if (logits.numel() * 4 < size) throw Error(G4C_ERR_DEVICE, "the compiled model returned fewer logits than the vocabulary");
    Buffer &staging = staging_buffer(size);
    wgpuCommandEncoderCopyBufferToBuffer(r.encoder.get(), logits.buffer, logits.numel() * 4 - size, staging.get(), 0, size);
    if (!r.uniforms.empty()) wgpuQueueWriteBuffer(queue_.get(), uniforms_.get(), 0, r.uniforms.data(), r.uniforms.size());
    submit(std::move(r.encoder));
    check("submitting the kernels");
    read(staging, in.logits, size);
  }

  void step(Recording &r, const Step &s) {
    switch (s.kind) {
      case StepKind::Rows: {  // the PLE rows the session gathered from the host table
        const View out = resolve(r, s.args[1]);
        const size_t nbytes = static_cast<size_t>(r.in.count) * kModel.ple_width * 4;
        if (!r.in.ple_rows || nbytes > out.nbytes()) throw Error(G4C_ERR_DEVICE, "the PLE rows do not fit their buffer");
        wgpuQueueWriteBuffer(queue_.get(), out.buffer, 0, r.in.ple_rows, nbytes);
        break;
      }
      case StepKind::Reshape: {  // the output is the input's buffer with the output's shape
        View v = resolve(r, s.args[0]);
        const View &out = r.activations[s.args[1].index];
        v.ndim = out.ndim;
        std::copy(out.shape, out.shape + 4, v.shape);
        r.activations[s.args[1].index] = v;
        break;
      }
      case StepKind::Last: {  // the last rows of the source: the destination's size from its end
        end_pass(r);
        const View src = resolve(r, s.args[0]), dst = resolve(r, s.args[1]);
        const uint64_t size = dst.nbytes();
        wgpuCommandEncoderCopyBufferToBuffer(r.encoder.get(), src.buffer, src.nbytes() - size, dst.buffer, 0, size);
        break;
      }
      case StepKind::Kernel: {
        if (!r.pass) r.pass = Pass(wgpuCommandEncoderBeginComputePass(r.encoder.get(), nullptr));
        std::vector<View> args(s.nargs);
        for (int i = 0; i < s.nargs; ++i) args[i] = resolve(r, s.args[i]);
        const KernelInfo &k = kModel.kernels[s.kernel];
        for (int l = 0; l < k.nlaunches; ++l) dispatch(r, kModel.launches[k.first_launch + l], args);
        break;
      }
    }
  }

  View resolve(const Recording &r, const BufferRef &ref) const {
    switch (ref.kind) {
      case RefKind::Input: return r.buffers.inputs[ref.index];
      case RefKind::Weight: return weight_views_[ref.index];
      case RefKind::Activation: return r.activations[ref.index];
      case RefKind::Cache: {  // bound as the rows the program needs
        const auto &full = cache_shapes_[ref.index];
        return View{caches_[ref.index].get(), 3, {r.in.cache_rows[ref.index], full[1], full[2], 0}, 4};
      }
    }
    return View{};
  }

  // one device launch: uniform words = shape dimensions of the parameters, grid from them; widths past
  // 65535 workgroups fold into z and the kernel skips blocks past packGridDimX = width - 1
  void dispatch(Recording &r, const LaunchInfo &launch, const std::vector<View> &args) {
    std::vector<int64_t> words(std::max(1, launch.nscalars));
    for (int j = 0; j < launch.nscalars; ++j) words[j] = args[launch.scalars[j][0]].shape[launch.scalars[j][1]];
    const int64_t width = launch.grid_x(words.data()), height = launch.grid_y(words.data());
    if (width == 0 || height == 0) return;
    const int64_t x = std::min(width, kMaxGroups), z = (width + x - 1) / x;

    // PODArgs: the words as little-endian i32, then packGridDimX as u32, padded to 16 bytes
    const uint64_t offset = r.uniforms.size(), pod = align_up(4 * (static_cast<uint64_t>(launch.nscalars) + 1), 16);
    r.uniforms.resize(offset + slot_bytes(launch, uniform_align_), 0);
    uint8_t *out = r.uniforms.data() + offset;
    for (int j = 0; j < launch.nscalars; ++j) {
      const int32_t w = static_cast<int32_t>(words[j]);
      std::memcpy(out + 4 * j, &w, 4);
    }
    const uint32_t pack = static_cast<uint32_t>(width - 1);
    std::memcpy(out + 4 * launch.nscalars, &pack, 4);

    std::vector<WGPUBindGroupEntry> entries(launch.nbuffers + 1, WGPU_BIND_GROUP_ENTRY_INIT);
    for (int i = 0; i < launch.nbuffers; ++i) {
      const View &v = args[launch.buffers[i]];
      entries[i].binding = i;
      entries[i].buffer = v.buffer;
      entries[i].offset = 0;
      entries[i].size = std::max<uint64_t>(4, v.nbytes());
    }
    WGPUBindGroupEntry &u = entries[launch.nbuffers];
    u.binding = launch.nbuffers;
    u.buffer = uniforms_.get();
    u.offset = offset;
    u.size = pod;
    WGPUBindGroupDescriptor descriptor = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
    descriptor.layout = layouts_[launch.shader].get();
    descriptor.entryCount = entries.size();
    descriptor.entries = entries.data();
    r.groups.emplace_back(wgpuDeviceCreateBindGroup(device_.get(), &descriptor));
    wgpuComputePassEncoderSetPipeline(r.pass.get(), pipelines_[launch.shader].get());
    wgpuComputePassEncoderSetBindGroup(r.pass.get(), 0, r.groups.back().get(), 0, nullptr);
    wgpuComputePassEncoderDispatchWorkgroups(r.pass.get(), static_cast<uint32_t>(x), static_cast<uint32_t>(height),
                                             static_cast<uint32_t>(z));
  }

  static void end_pass(Recording &r) {
    if (!r.pass) return;
    wgpuComputePassEncoderEnd(r.pass.get());
    r.pass.reset();
  }

  // queue writes take multiples of 4 bytes
  void write_padded(WGPUBuffer buffer, const void *data, size_t nbytes) {
    if (nbytes % 4 == 0) {
      if (nbytes) wgpuQueueWriteBuffer(queue_.get(), buffer, 0, data, nbytes);
      return;
    }
    padded_.assign(align_up(nbytes, 4), 0);
    std::memcpy(padded_.data(), data, nbytes);
    wgpuQueueWriteBuffer(queue_.get(), buffer, 0, padded_.data(), padded_.size());
  }

  void submit(Encoder encoder) {
    Commands commands(wgpuCommandEncoderFinish(encoder.get(), nullptr));
    check("finishing the command buffer");
    WGPUCommandBuffer list[] = {commands.get()};
    wgpuQueueSubmit(queue_.get(), 1, list);
  }

  Buffer &staging_buffer(uint64_t size) {
    if (size > staging_size_) {
      staging_ = buffer(size, WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst);
      staging_size_ = size;
      check("allocating the read-back buffer");
    }
    return staging_;
  }

  // map the read-back buffer (wgpu-native answers during a device poll), copy it out, unmap
  void read(Buffer &staging, float *out, uint64_t size) {
    struct Result {
      bool done = false;
      WGPUMapAsyncStatus status = WGPUMapAsyncStatus_Error;
      std::string message;
    } result;
    WGPUBufferMapCallbackInfo callback = WGPU_BUFFER_MAP_CALLBACK_INFO_INIT;
    callback.mode = WGPUCallbackMode_AllowProcessEvents;
    callback.callback = [](WGPUMapAsyncStatus status, WGPUStringView message, void *user, void *) {
      auto *r = static_cast<Result *>(user);
      r->done = true;
      r->status = status;
      r->message = text(message);
    };
    callback.userdata1 = &result;
    wgpuBufferMapAsync(staging.get(), WGPUMapMode_Read, 0, size, callback);
    while (!result.done) {
      wgpuDevicePoll(device_.get(), true, nullptr);
      wgpuInstanceProcessEvents(instance_);
      check("running the kernels");
    }
    if (result.status != WGPUMapAsyncStatus_Success)
      throw Error(G4C_ERR_DEVICE, "wgpu: reading the logits back: " + last_line(result.message));
    const void *data = wgpuBufferGetConstMappedRange(staging.get(), 0, size);
    if (data) std::memcpy(out, data, size);
    wgpuBufferUnmap(staging.get());
    if (!data) throw Error(G4C_ERR_DEVICE, "wgpu: reading the logits back: the mapped range is empty");
  }

  // declaration order is release order reversed: error_ outlives the device (its callbacks write it)
  std::string error_;
  WGPUInstance instance_;  // shared by the process's sessions, never released (shared_instance)
  Adapter adapter_;
  Device device_;
  Queue queue_;
  uint64_t uniform_align_ = 256;
  std::vector<Buffer> weights_;
  std::vector<View> weight_views_;
  std::vector<Pipeline> pipelines_;  // per ModelInfo::shaders
  std::vector<Layout> layouts_;      // their bind group 0
  std::vector<Buffer> caches_;
  std::vector<std::array<int64_t, 3>> cache_shapes_;
  Buffer uniforms_, staging_;
  uint64_t staging_size_ = 0;
  std::map<std::pair<int, std::vector<int64_t>>, ProgramBuffers> buffers_;
  std::vector<uint8_t> padded_;
};

}  // namespace

std::unique_ptr<Executor> make_executor(const ExecutorOptions &options) { return std::make_unique<WgpuExecutor>(options); }

}  // namespace g4c
