// vm_executor.cpp — runs the artifact's Relax VM executable (kernels.so) through the tvm-ffi C++ API
// and TVM's runtime library, as g4c/runtime/relax_vm.py does from Python: on the CPU the weights are
// views of the mapped weight file and the KV caches are host buffers the kernels update in place; on a
// GPU both live in device memory from the TVM runtime's allocator. A static decode (CUDA graphs) gets
// the same input tensors on every step.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>

#include <cstdlib>
#include <optional>
#include <cstring>

#include "g4c.h"
#include "internal.h"

namespace g4c {
namespace {

namespace ffi = tvm::ffi;
constexpr int kCPU = 1;        // DLPack device type
constexpr int kPooled = 2;     // Relax VM allocator kind
constexpr size_t kAlign = 64;  // TVM kernels assume 64-byte aligned buffers

DLDataType dl_dtype(DType dtype) {
  switch (dtype) {
    case DType::F32: return {kDLFloat, 32, 1};
    case DType::F16: return {kDLFloat, 16, 1};
    case DType::BF16: return {kDLUInt, 16, 1};  // bf16 weights travel as their uint16 bit patterns
    case DType::I32: return {kDLInt, 32, 1};
    case DType::I64: return {kDLInt, 64, 1};
    case DType::U32: return {kDLUInt, 32, 1};
    case DType::U8: return {kDLUInt, 8, 1};
  }
  return {kDLFloat, 32, 1};
}

// a Tensor over memory someone else owns (the mapped weight file, the session's cache buffers)
struct Borrowed {
  void *data;
  void AllocData(DLTensor *t) { t->data = data; }
  void FreeData(DLTensor *) {}
};

ffi::Tensor borrow(const void *data, const std::vector<int64_t> &shape, DLDataType dtype, DLDevice device) {
  return ffi::Tensor::FromNDAlloc(Borrowed{const_cast<void *>(data)}, ffi::ShapeView(shape.data(), shape.size()), dtype,
                                  device);
}

struct FreeAligned {
  void operator()(void *p) const { std::free(p); }
};

// a growable 64-byte aligned host buffer
class HostBuffer {
 public:
  void *reserve(size_t nbytes) {
    if (nbytes > capacity_) {
      capacity_ = (nbytes + kAlign - 1) / kAlign * kAlign;
      data_.reset(std::aligned_alloc(kAlign, capacity_));
      if (!data_) throw std::bad_alloc();
    }
    return data_.get();
  }
  void *get() const { return data_.get(); }

 private:
  std::unique_ptr<void, FreeAligned> data_;
  size_t capacity_ = 0;
};

ffi::Function global(const char *name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f) throw Error(G4C_ERR_DEVICE, std::string("the TVM runtime lacks ") + name);
  return *f;
}

class VMExecutor : public Executor {
 public:
  explicit VMExecutor(const ExecutorOptions &options) {
    load_runtime_libraries();
    if (options.n_threads > 0) global("runtime.config_threadpool")(1, options.n_threads);  // 1: big cores first
    const std::string path = options.directory + "/" + kModel.library;
    // G4C_RUNTIME_MEMORY=1 keeps a CPU artifact's buffers in TVM runtime tensors: the GPU code path
    // (allocations, copies, views), testable without a GPU, as g4c.load(..., runtime_memory=True)
    const char *runtime_memory = std::getenv("G4C_RUNTIME_MEMORY");
    on_device_ = kModel.device_type != kCPU || (runtime_memory && std::string(runtime_memory) == "1");
    device_ = DLDevice{static_cast<DLDeviceType>(kModel.device_type), 0};
    try {
      library_ = ffi::Module::LoadFromFile(path);
      vm_ = (*library_)->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
      if (on_device_) {
        (*vm_)->GetFunction("vm_initialization").value()(kModel.device_type, 0, kPooled, kCPU, 0, kPooled);
      } else {
        (*vm_)->GetFunction("vm_initialization").value()(kCPU, 0, kPooled);
      }
      for (int p = 0; p < N_PROGRAMS; ++p)
        if (kModel.programs[p]) programs_[p] = (*vm_)->GetFunction(kModel.programs[p]->name).value();
    } catch (const ffi::Error &e) {
      throw Error(G4C_ERR_DEVICE, "cannot load the compiled model " + path + ": " + e.message());
    }
    if (on_device_) {
      alloc_ = global("runtime.TVMTensorAllocWithScope");
      copy_ = global("runtime.TVMTensorCopyFromTo");
      view_ = global("runtime.TVMTensorCreateView");
    }
  }

  void upload_weights(const std::vector<HostTensor> &weights) override {
    for (const HostTensor &w : weights) weights_.push_back(on_device_ ? upload(w.data, w.shape, dl_dtype(w.dtype))
                                                                      : borrow(w.data, w.shape, dl_dtype(w.dtype), cpu()));
  }

  void allocate_caches(const std::vector<std::array<int64_t, 3>> &shapes) override {
    for (const auto &s : shapes) {
      std::vector<int64_t> shape(s.begin(), s.end());
      const size_t nbytes = static_cast<size_t>(s[0] * s[1] * s[2]) * 4;
      host_caches_.emplace_back();
      void *host = host_caches_.back().reserve(std::max<size_t>(nbytes, 4));
      std::memset(host, 0, nbytes);
      cache_shapes_.push_back(shape);
      caches_.push_back(on_device_ ? empty(shape, dl_dtype(DType::F32)) : borrow(host, shape, dl_dtype(DType::F32), cpu()));
    }
    if (on_device_) host_caches_.clear();  // device caches are zeroed from one host buffer of zeros
  }

  void clear_caches() override {
    for (size_t i = 0; i < caches_.size(); ++i) {
      const auto &shape = cache_shapes_[i];
      const size_t nbytes = static_cast<size_t>(shape[0] * shape[1] * shape[2]) * 4;
      if (!on_device_) {
        std::memset(host_caches_[i].get(), 0, nbytes);
        continue;
      }
      std::memset(zeros_.reserve(nbytes), 0, nbytes);
      (*copy_)(borrow(zeros_.get(), shape, dl_dtype(DType::F32), cpu()), caches_[i]);
    }
  }

  void run(const RunInputs &in) override {
    std::vector<HostTensor> sources = in.inputs;
    if (in.ple_rows) {
      const int64_t width = kModel.ple_width;
      sources.push_back({in.ple_rows, DType::F32, {in.count, width}, static_cast<size_t>(in.count * width) * 4});
    }
    const bool fixed = in.program == DECODE && kModel.static_decode;
    if (inputs_.size() < sources.size()) inputs_.resize(sources.size());
    std::vector<ffi::Any> args;
    for (size_t i = 0; i < sources.size(); ++i)
      args.push_back(input(i, fixed, sources[i].data, sources[i].shape, sources[i].dtype, sources[i].nbytes));
    for (const auto &w : weights_) args.push_back(w);
    for (size_t i = 0; i < caches_.size(); ++i) args.push_back(cache_rows(i, in.cache_rows[i]));
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any result;
    programs_[in.program]->CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    ffi::Tensor output = first_tensor(result);
    copy_output(output, in.logits, in.logits_floats, in.whole);
  }

 private:
  static DLDevice cpu() { return DLDevice{kDLCPU, 0}; }

  // the device runtime libraries shipped beside libg4c.so (CUDA's module loader, libcudart), loaded into
  // the global namespace once per process; the GPU driver's libraries come from the system
  static void load_runtime_libraries() {
    Dl_info self;
    if (kModel.n_loaded == 0 || !dladdr(reinterpret_cast<const void *>(&kModel), &self) || !self.dli_fname) return;
    std::string folder = self.dli_fname;
    folder = folder.substr(0, folder.rfind('/') + 1);
    for (int i = 0; i < kModel.n_loaded; ++i) {
      const std::string path = folder + kModel.loaded[i];
      if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
        const char *why = dlerror();
        throw Error(G4C_ERR_DEVICE, std::string("cannot load ") + kModel.loaded[i] + ": " + (why ? why : "dlopen failed"));
      }
    }
  }

  ffi::Tensor empty(const std::vector<int64_t> &shape, DLDataType dtype) {
    return (*alloc_)(ffi::Shape(shape), dtype, device_, ffi::String("global")).cast<ffi::Tensor>();
  }

  ffi::Tensor upload(const void *data, const std::vector<int64_t> &shape, DLDataType dtype) {
    ffi::Tensor tensor = empty(shape, dtype);
    (*copy_)(borrow(data, shape, dtype, cpu()), tensor);
    return tensor;
  }

  // input i of a program: a 64-byte aligned host copy (CPU) or a device copy; a static decode reuses
  // the tensors of its first step (the CUDA graph captured then reads those addresses on every replay)
  ffi::Tensor input(size_t i, bool fixed, const void *data, const std::vector<int64_t> &shape, DType dtype, size_t nbytes) {
    if (fixed && i < fixed_.size()) {
      if (on_device_) {
        (*copy_)(borrow(data, shape, dl_dtype(dtype), cpu()), fixed_[i]);
      } else {
        std::memcpy(fixed_hosts_[i].get(), data, nbytes);
      }
      return fixed_[i];
    }
    ffi::Tensor tensor;
    if (on_device_) {
      tensor = upload(data, shape, dl_dtype(dtype));
    } else {
      HostBuffer &buffer = fixed ? (fixed_hosts_.emplace_back(), fixed_hosts_.back()) : inputs_[i];
      void *host = buffer.reserve(std::max<size_t>(nbytes, 4));
      std::memcpy(host, data, nbytes);
      tensor = borrow(host, shape, dl_dtype(dtype), cpu());
    }
    if (fixed) fixed_.push_back(tensor);
    return tensor;
  }

  ffi::Tensor cache_rows(size_t slot, int64_t rows) {
    const auto &full = cache_shapes_[slot];
    if (rows == full[0]) return caches_[slot];
    std::vector<int64_t> shape = {rows, full[1], full[2]};
    if (on_device_) return (*view_)(caches_[slot], ffi::Shape(shape), dl_dtype(DType::F32), 0).cast<ffi::Tensor>();
    return borrow(host_caches_[slot].get(), shape, dl_dtype(DType::F32), cpu());
  }

  static ffi::Tensor first_tensor(const ffi::Any &result) {
    if (auto tensor = result.as<ffi::Tensor>()) return *tensor;
    return result.cast<ffi::Array<ffi::Any>>()[0].cast<ffi::Tensor>();
  }

  // the last `floats` floats of a program's output (`whole`: the output must be exactly that size)
  void copy_output(const ffi::Tensor &logits, float *out, size_t floats, bool whole) {
    int64_t numel = 1;
    for (int64_t d : logits.shape()) numel *= d;
    if (whole && static_cast<size_t>(numel) != floats)
      throw Error(G4C_ERR_DEVICE, "the compiled encoder returned " + std::to_string(numel) + " floats, not the " +
                                      std::to_string(floats) + " of its soft tokens");
    if (static_cast<size_t>(numel) < floats) throw Error(G4C_ERR_DEVICE, "the compiled model returned fewer logits than the vocabulary");
    if (!on_device_) {
      const DLTensor *t = logits.GetDLTensorPtr();
      const auto *data = reinterpret_cast<const float *>(static_cast<const char *>(t->data) + t->byte_offset);
      std::memcpy(out, data + (numel - floats), floats * 4);
      return;
    }
    std::vector<int64_t> shape(logits.shape().begin(), logits.shape().end());
    void *host = download_.reserve(static_cast<size_t>(numel) * 4);
    (*copy_)(logits, borrow(host, shape, dl_dtype(DType::F32), cpu()));
    std::memcpy(out, static_cast<const float *>(host) + (numel - floats), floats * 4);
  }

  std::optional<ffi::Module> library_, vm_;
  std::optional<ffi::Function> programs_[N_PROGRAMS];
  std::optional<ffi::Function> alloc_, copy_, view_;
  DLDevice device_;
  bool on_device_ = false;
  std::vector<ffi::Tensor> weights_, caches_, fixed_;
  std::vector<std::vector<int64_t>> cache_shapes_;
  std::vector<HostBuffer> host_caches_, fixed_hosts_;
  std::vector<HostBuffer> inputs_;  // one per input position, reused by every run
  HostBuffer zeros_, download_;
};

}  // namespace

std::unique_ptr<Executor> make_executor(const ExecutorOptions &options) { return std::make_unique<VMExecutor>(options); }

}  // namespace g4c
