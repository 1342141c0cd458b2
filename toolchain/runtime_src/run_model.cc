// run_model: loads a model that socc exported as a shared library and runs its `main`.
//
//   run_model MODEL.so OUT_DIR IN_0.npy [IN_1.npy ...] [--repeat N] [--threads N]
//
// Reads each input from a .npy file, calls `main` once with them (in order), and writes every
// output to OUT_DIR/out_<k>.npy (a tuple result is flattened depth-first). With --repeat N it
// then calls `main` N more times and prints "timing_ms median=X min=Y runs=N". --threads N sets
// the size of TVM's CPU thread pool. On error it prints one line on stderr and exits with 1.
//
// This file is also the example of loading a socc artifact from your own C++ code: the four
// numbered steps in RunModel() are all an app needs. It uses only the tvm_ffi headers. Link it
// with -ltvm_runtime -ltvm_ffi, and -Wl,--no-as-needed before them: nothing here calls
// libtvm_runtime by name, but the model needs it loaded (Relax VM, CPU device, kernels' helpers).

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

[[noreturn]] void Fail(const std::string& message) { throw std::runtime_error(message); }

// ---------------------------------------------------------------- .npy files

// The element types we read and write, by numpy's type string ("descr").
struct NpyType {
  const char* descr;
  DLDataType dtype;
};
const NpyType kNpyTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<f2", {kDLFloat, 16, 1}},
    {"<i8", {kDLInt, 64, 1}},   {"<i4", {kDLInt, 32, 1}},   {"<i2", {kDLInt, 16, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},   {"|b1", {kDLBool, 8, 1}},
};

const NpyType* FindType(const std::string& descr) {
  for (const NpyType& t : kNpyTypes) {
    if (descr == t.descr) return &t;
  }
  return nullptr;
}

const NpyType* FindType(DLDataType dtype) {
  for (const NpyType& t : kNpyTypes) {
    if (t.dtype.code == dtype.code && t.dtype.bits == dtype.bits && dtype.lanes == 1) return &t;
  }
  return nullptr;
}

// Tensor memory on the CPU, 64-byte aligned like TVM's own allocations.
struct CpuAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = std::max<size_t>((ffi::GetDataSize(*t) + 63) / 64 * 64, 64);
    t->data = std::aligned_alloc(64, bytes);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// The text after 'key': in a .npy header, which is a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
std::string HeaderField(const std::string& header, const std::string& key,
                        const std::string& path) {
  size_t at = header.find("'" + key + "':");
  if (at == std::string::npos) Fail(path + ": the .npy header has no '" + key + "'");
  at = header.find_first_not_of(' ', at + key.size() + 3);
  return at == std::string::npos ? "" : header.substr(at);
}

// Reads a C-order .npy file (format version 1, 2 or 3) into a new CPU tensor.
ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail("cannot open " + path);
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    Fail(path + ": not a .npy file");
  }
  unsigned char size[4] = {0, 0, 0, 0};  // little-endian header size: 2 bytes in v1, 4 after
  in.read(reinterpret_cast<char*>(size), magic[6] == 1 ? 2 : 4);
  std::string header(size[0] | size[1] << 8 | size[2] << 16 | size_t{size[3]} << 24, '\0');
  if (!in.read(&header[0], header.size())) Fail(path + ": truncated .npy header");

  std::string descr = HeaderField(header, "descr", path).substr(1, 3);  // skip the opening quote
  const NpyType* type = FindType(descr);
  if (type == nullptr) Fail(path + ": unsupported .npy dtype '" + descr + "'");
  if (HeaderField(header, "fortran_order", path).rfind("False", 0) != 0) {
    Fail(path + ": Fortran-order arrays are not supported");
  }
  std::string dims = HeaderField(header, "shape", path);  // "(2, 3), ...", "(3,), ...", "(), ..."
  std::istringstream items(dims.substr(1, dims.find(')') - 1));
  std::vector<int64_t> shape;
  for (std::string item; std::getline(items, item, ',');) {
    if (item.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(item));
  }

  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(CpuAlloc(), ffi::Shape(shape), type->dtype,
                                                DLDevice{kDLCPU, 0});
  size_t bytes = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  if (!in.read(static_cast<char*>(tensor.data_ptr()), bytes)) Fail(path + ": truncated data");
  return tensor;
}

// Writes a contiguous CPU tensor as a version 1 .npy file.
void WriteNpy(const std::string& path, const ffi::Tensor& tensor) {
  const DLTensor& t = *tensor.GetDLTensorPtr();
  if (t.device.device_type != kDLCPU || !tensor.IsContiguous()) {
    Fail(path + ": the output is not a contiguous CPU tensor");
  }
  const NpyType* type = FindType(t.dtype);
  if (type == nullptr) {
    Fail(path + ": no .npy type for " + std::string(ffi::DLDataTypeToString(t.dtype)));
  }

  std::string shape = "(";  // Python tuple syntax: "()", "(3,)", "(2, 3)"
  for (int i = 0; i < t.ndim; ++i) shape += (i > 0 ? ", " : "") + std::to_string(t.shape[i]);
  shape += t.ndim == 1 ? ",)" : ")";
  std::string header = "{'descr': '" + std::string(type->descr) +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // the data starts 64-byte aligned
  header += '\n';

  std::ofstream out(path, std::ios::binary);
  const char preamble[10] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0,  // magic, version 1.0
                             static_cast<char>(header.size() & 0xff),  // header size, uint16
                             static_cast<char>(header.size() >> 8)};
  out.write(preamble, sizeof(preamble));
  out << header;
  out.write(static_cast<const char*>(t.data) + t.byte_offset, ffi::GetDataSize(t));
  if (!out) Fail("cannot write " + path);
}

// ---------------------------------------------------------------- running

// Collects the tensors of a result in order; tuples (ffi::Array) are flattened depth-first.
void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto tuple = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *tuple) Flatten(item, out);
  } else {
    Fail("main returned a " + value.GetTypeKey() + "; expected tensors or tuples of tensors");
  }
}

ffi::Function GetFunction(const ffi::Module& module, const std::string& name,
                          const std::string& what) {
  ffi::Optional<ffi::Function> f = module->GetFunction(name);
  if (!f.has_value()) Fail(what);
  return *f;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

void RunModel(const std::string& model_path, const std::string& out_dir,
              const std::vector<std::string>& input_paths, int repeat) {
  // 1. Load the library; this also restores the Relax VM executable embedded in it. (It is
  //    opened with dlopen, which looks a name without a '/' up in the library path, hence "./".)
  bool bare_name = model_path.find('/') == std::string::npos;
  ffi::Module lib = ffi::Module::LoadFromFile(bare_name ? "./" + model_path : model_path);
  // 2. Make a VM for it on the CPU: (device type, device id, allocator: 1 naive, 2 pooled).
  ffi::Function load_vm =
      GetFunction(lib, "vm_load_executable", model_path + " is not a Relax VM module");
  ffi::Module vm = load_vm().cast<ffi::Module>();
  GetFunction(vm, "vm_initialization", "no vm_initialization")(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main_fn = GetFunction(vm, "main", model_path + " has no 'main' function");

  // 3. Call main with the input tensors, positionally.
  std::vector<ffi::Tensor> inputs;
  for (const std::string& path : input_paths) inputs.push_back(ReadNpy(path));
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  auto call_main = [&]() {
    ffi::Any result;
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    return result;
  };
  ffi::Any result = call_main();

  // 4. Use the outputs: here, save them (OUT_DIR is created if it does not exist).
  std::vector<ffi::Tensor> outputs;
  Flatten(result, &outputs);
  mkdir(out_dir.c_str(), 0755);
  for (size_t k = 0; k < outputs.size(); ++k) {
    WriteNpy(out_dir + "/out_" + std::to_string(k) + ".npy", outputs[k]);
  }

  if (repeat > 0) {
    std::vector<double> ms;
    for (int i = 0; i < repeat; ++i) {
      auto start = std::chrono::steady_clock::now();
      call_main();
      std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
      ms.push_back(elapsed.count());
    }
    std::printf("timing_ms median=%.4f min=%.4f runs=%d\n", Median(ms),
                *std::min_element(ms.begin(), ms.end()), repeat);
  }
}

int ParseCount(const std::string& flag, const char* text, long min) {
  char* end = nullptr;
  long value = text == nullptr ? -1 : std::strtol(text, &end, 10);
  if (text == nullptr || *end != '\0' || value < min || value > 1000000) {
    Fail(flag + " needs a number from " + std::to_string(min) + " to 1000000");
  }
  return static_cast<int>(value);
}

}  // namespace

int main(int argc, char** argv) {
  std::string error;
  try {
    std::vector<std::string> positional;
    int repeat = 0;
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
      if (arg == "--repeat") {
        repeat = ParseCount(arg, value, 0);
        ++i;
      } else if (arg == "--threads") {
        // TVM's thread pool reads this when it starts, on the first call of main.
        setenv("TVM_NUM_THREADS", std::to_string(ParseCount(arg, value, 1)).c_str(), 1);
        ++i;
      } else {
        positional.push_back(arg);
      }
    }
    if (positional.size() < 2) {
      Fail("usage: run_model MODEL.so OUT_DIR IN_0.npy [IN_1.npy ...] [--repeat N] [--threads N]");
    }
    RunModel(positional[0], positional[1], {positional.begin() + 2, positional.end()}, repeat);
    return 0;
  } catch (const ffi::Error& e) {
    error = e.kind() + ": " + e.message();
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::replace(error.begin(), error.end(), '\n', ' ');
  std::fprintf(stderr, "run_model: %s\n", error.c_str());
  return 1;
}
