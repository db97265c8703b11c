// Host side of kernel launches: the CUDA driver API (resolved at run time), per-device state, the in-memory
// cache of loaded kernel variants, and the callback into Python that compiles a missing one.
//
// Only device-generic c10 headers and cuda.h are used (no c10/cuda, no CUDA runtime): the host glue then
// builds against any torch, CPU-only wheels included (CI builds and loads it), and needs only cuda.h, which
// the nvidia-cuda-runtime wheel ships.
#include "launcher.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "message.h"

namespace inductor_moe {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Driver API, resolved from libcuda.so.1 at first use: linking libcuda would make this library fail to load
// on a machine without a driver with an error that does not say what is missing.
struct Driver {
  decltype(&cuGetErrorString) get_error_string = nullptr;
  decltype(&cuDeviceGet) device_get = nullptr;
  decltype(&cuDeviceGetAttribute) device_get_attribute = nullptr;
  decltype(&cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&cuCtxGetCurrent) ctx_get_current = nullptr;
  decltype(&cuCtxSetCurrent) ctx_set_current = nullptr;
  decltype(&cuModuleLoadData) module_load_data = nullptr;
  decltype(&cuModuleGetFunction) module_get_function = nullptr;
  decltype(&cuLaunchKernelEx) launch_kernel_ex = nullptr;
  // Optional (drivers of CUDA 12.3 and newer; null without them): what the next node of a stream capture will
  // depend on, and the kind of each edge into a node. Spelled out, not decltype'd: cuda.h maps the plain names
  // to the versions of its own release, and these are the ones with edge data.
  CUresult (*stream_get_capture_info)(CUstream, CUstreamCaptureStatus*, cuuint64_t*, CUgraph*, const CUgraphNode**,
                                      const CUgraphEdgeData**, size_t*) = nullptr;
  CUresult (*graph_node_get_dependencies)(CUgraphNode, CUgraphNode*, CUgraphEdgeData*, size_t*) = nullptr;
};

template <typename F>
void resolve(void* handle, F& fn, const char* name) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  TORCH_CHECK(fn != nullptr, cat("inductor_moe: the CUDA driver (libcuda.so.1) has no symbol ", name,
                                 "; a driver for CUDA 12.0 or newer is needed"));
}

const Driver& driver() {
  static const Driver d = [] {
    void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(handle != nullptr, cat("inductor_moe: the CUDA driver library libcuda.so.1 could not be loaded (",
                                       dlerror(), "); is an NVIDIA driver installed?"));
    Driver r;
    resolve(handle, r.get_error_string, "cuGetErrorString");
    resolve(handle, r.device_get, "cuDeviceGet");
    resolve(handle, r.device_get_attribute, "cuDeviceGetAttribute");
    resolve(handle, r.primary_ctx_retain, "cuDevicePrimaryCtxRetain");
    resolve(handle, r.ctx_get_current, "cuCtxGetCurrent");
    resolve(handle, r.ctx_set_current, "cuCtxSetCurrent");
    resolve(handle, r.module_load_data, "cuModuleLoadData");
    resolve(handle, r.module_get_function, "cuModuleGetFunction");
    resolve(handle, r.launch_kernel_ex, "cuLaunchKernelEx");
    r.stream_get_capture_info =
        reinterpret_cast<decltype(r.stream_get_capture_info)>(dlsym(handle, "cuStreamGetCaptureInfo_v3"));
    r.graph_node_get_dependencies =
        reinterpret_cast<decltype(r.graph_node_get_dependencies)>(dlsym(handle, "cuGraphNodeGetDependencies_v2"));
    return r;
  }();
  return d;
}

void check_cu(CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  driver().get_error_string(result, &msg);
  TORCH_CHECK(false, cat("inductor_moe: ", what, " failed: ", msg ? msg : "unknown CUDA driver error", " (",
                         static_cast<int>(result), ")"));
}

// ---------------------------------------------------------------------------------------------------------
// Per-device state and the kernel cache.
struct DeviceInfo {
  CUcontext primary = nullptr;  // torch runs every device on its primary context
  int major = 0;
  int minor = 0;
  int sms = 0;  // multiprocessors
};

// Set by kernels/jit.py: compile (or find in the disk cache) a variant for an arch and write its path to
// `path`. Returns 0 on success; otherwise `path` holds the error message.
using CompileFn = int (*)(const char* family, const char* defines, int major, int minor, char* path, size_t cap);

std::mutex g_mutex;
CompileFn g_compile = nullptr;
std::deque<DeviceInfo> g_devices;                      // a deque: references stay valid when it grows
std::unordered_map<uint64_t, CUfunction> g_functions;  // (device, family, variant key) -> entry point

const DeviceInfo& device_info(int index) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (static_cast<int>(g_devices.size()) <= index) g_devices.resize(index + 1);
  DeviceInfo& info = g_devices[index];
  if (info.primary == nullptr) {
    const Driver& d = driver();
    CUdevice dev;
    check_cu(d.device_get(&dev, index), "cuDeviceGet");
    check_cu(d.device_get_attribute(&info.major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
             "cuDeviceGetAttribute");
    check_cu(d.device_get_attribute(&info.minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
             "cuDeviceGetAttribute");
    check_cu(d.device_get_attribute(&info.sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
    CUcontext ctx;
    check_cu(d.primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    info.primary = ctx;
  }
  return info;
}

// The context current on this thread must be the device's primary one for module loads and launches; a
// thread that never touched the CUDA runtime has none.
void make_current(const DeviceInfo& info) {
  CUcontext current = nullptr;
  check_cu(driver().ctx_get_current(&current), "cuCtxGetCurrent");
  if (current != info.primary) check_cu(driver().ctx_set_current(info.primary), "cuCtxSetCurrent");
}

// The cache key of a variant: device, family and the defines' values packed bit field after bit field.
uint64_t variant_key(int device, Family family, std::initializer_list<Define> defines) {
  uint64_t variant = 0;
  int shift = 0;
  for (const Define& d : defines) {
    TORCH_CHECK(d.value >= 0 && d.value < (1 << d.bits) && shift + d.bits <= 32,
                cat("inductor_moe: define ", d.name, "=", d.value, " does not fit its key bits"));
    variant |= static_cast<uint64_t>(d.value) << shift;
    shift += d.bits;
  }
  return (static_cast<uint64_t>(device) << 48) | (static_cast<uint64_t>(family) << 32) | variant;
}

std::string format_defines(std::initializer_list<Define> defines) {
  std::string out;
  for (const Define& d : defines) {
    if (!out.empty()) out += ';';
    out += d.name;
    out += '=';
    out += std::to_string(d.value);
  }
  return out;
}

const char* family_name(Family family) {
  static constexpr const char* kNames[] = {
#define INDUCTOR_MOE_FAMILY_NAME(name) #name,
      INDUCTOR_MOE_FAMILIES(INDUCTOR_MOE_FAMILY_NAME)
#undef INDUCTOR_MOE_FAMILY_NAME
  };
  return kNames[static_cast<uint32_t>(family)];
}

CUfunction get_function(int device, const DeviceInfo& info, Family family_id,
                        std::initializer_list<Define> define_list) {
  const uint64_t key = variant_key(device, family_id, define_list);
  const char* family = family_name(family_id);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_functions.find(key);
    if (it != g_functions.end()) return it->second;
  }
  // Slow path, once per variant and device. The lock is not held across the callback: it takes the GIL,
  // which another thread may hold while it waits for this lock. Two threads may then both compile the
  // variant; the disk cache makes that harmless.
  TORCH_CHECK(g_compile != nullptr, cat("inductor_moe: the kernel compiler was not registered; import inductor_moe"));
  const std::string defines = format_defines(define_list);
  char path[4096] = {0};
  const int rc = g_compile(family, defines.c_str(), info.major, info.minor, path, sizeof(path));
  TORCH_CHECK(rc == 0, cat("inductor_moe: compiling ", family, " [", defines, "] for sm_", info.major, info.minor,
                           " failed: ", path));
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file.good(), cat("inductor_moe: cannot read compiled kernel ", path));
  std::vector<char> image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  image.push_back('\0');  // PTX images must be NUL-terminated; cubins ignore the extra byte
  CUmodule module;
  check_cu(driver().module_load_data(&module, image.data()), "cuModuleLoadData");
  CUfunction fn;
  check_cu(driver().module_get_function(&fn, module, "inductor_moe_kernel"), "cuModuleGetFunction");
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_functions.emplace(key, fn).first->second;
}

// PDL on sm90+ unless INDUCTOR_MOE_PDL=0 (read per call, like every INDUCTOR_MOE_* setting; see config.py).
bool pdl_allowed(const DeviceInfo& info) {
  if (info.major < 9) return false;
  const char* env = std::getenv("INDUCTOR_MOE_PDL");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// The capture a stream is in (status ACTIVE) and the nodes its next node will depend on; false when it is not
// capturing, or the driver lacks the queries (older than CUDA 12.3).
bool capture_state(CUstream stream, cuuint64_t* id, const CUgraphNode** deps, size_t* n) {
  const Driver& d = driver();
  if (d.stream_get_capture_info == nullptr || d.graph_node_get_dependencies == nullptr) return false;
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  return d.stream_get_capture_info(stream, &status, id, nullptr, deps, nullptr, n) == CUDA_SUCCESS &&
         status == CU_STREAM_CAPTURE_STATUS_ACTIVE;
}

// Our kernels captured with PDL in the capture `g_pdl_capture` (one capture at a time is tracked: another one
// starting forgets them, which only makes a launch after them plain). Their launch leaves no trace in the graph
// when they come first, with no edge in.
std::mutex g_pdl_mutex;
cuuint64_t g_pdl_capture = 0;
std::unordered_set<CUgraphNode> g_pdl_nodes;

// Whether a captured node is a kernel launched with PDL: one of ours so launched, or one with a programmatic
// edge in (what a PDL launch after a kernel becomes; a kernel launched plain, a memset or an event has none).
bool launched_with_pdl(cuuint64_t capture, CUgraphNode node) {
  {
    std::lock_guard<std::mutex> lock(g_pdl_mutex);
    if (capture == g_pdl_capture && g_pdl_nodes.count(node) != 0) return true;
  }
  const Driver& d = driver();
  size_t n = 0;
  if (d.graph_node_get_dependencies(node, nullptr, nullptr, &n) != CUDA_SUCCESS || n == 0) return false;
  std::vector<CUgraphNode> deps(n);
  std::vector<CUgraphEdgeData> edges(n);
  if (d.graph_node_get_dependencies(node, deps.data(), edges.data(), &n) != CUDA_SUCCESS) return false;
  for (size_t i = 0; i < n; ++i) {
    if (edges[i].type == CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC) return true;
  }
  return false;
}

// Whether a launch on `stream` follows only kernels launched with PDL: false when it is being captured after
// any node that was not (a GEMM, an ATen kernel); true outside a capture (the kernel before is unknown), at the
// start of one, and with drivers without the capture queries.
bool follows_pdl_launches(CUstream stream) {
  cuuint64_t capture = 0;
  const CUgraphNode* deps = nullptr;
  size_t n = 0;
  if (!capture_state(stream, &capture, &deps, &n)) return true;
  for (size_t i = 0; i < n; ++i) {
    if (!launched_with_pdl(capture, deps[i])) return false;
  }
  return true;
}

// After a PDL launch on `stream`: if it was captured, its node (the capture's one dependency now) is noted.
void note_pdl_launch(CUstream stream) {
  cuuint64_t capture = 0;
  const CUgraphNode* deps = nullptr;
  size_t n = 0;
  if (!capture_state(stream, &capture, &deps, &n) || n != 1) return;
  std::lock_guard<std::mutex> lock(g_pdl_mutex);
  if (capture != g_pdl_capture) {
    g_pdl_capture = capture;
    g_pdl_nodes.clear();
  }
  g_pdl_nodes.insert(deps[0]);
}

// torch's current stream on `device` (what c10::cuda::getCurrentCUDAStream returns), through the
// device-generic guard interface.
CUstream current_stream(const c10::Device& device) {
  static const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<CUstream>(impl->getStream(device).native_handle());
}

}  // namespace

int multiprocessor_count(const c10::Device& device) { return device_info(device.index()).sms; }

void launch_kernel(const c10::Device& device, Family family, std::initializer_list<Define> defines, Dim3 grid,
                   Dim3 block, void** args, Pdl pdl) {
  const DeviceInfo& info = device_info(device.index());
  make_current(info);
  CUfunction fn = get_function(device.index(), info, family, defines);
  CUlaunchAttribute attr;
  attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
  attr.value.programmaticStreamSerializationAllowed = 1;
  CUlaunchConfig config;
  std::memset(&config, 0, sizeof(config));
  config.gridDimX = grid.x;
  config.gridDimY = grid.y;
  config.gridDimZ = grid.z;
  config.blockDimX = block.x;
  config.blockDimY = block.y;
  config.blockDimZ = block.z;
  config.hStream = current_stream(device);
  config.attrs = &attr;
  const bool with_pdl = pdl_allowed(info) && (pdl == Pdl::kAlways || follows_pdl_launches(config.hStream));
  config.numAttrs = with_pdl ? 1 : 0;
  check_cu(driver().launch_kernel_ex(&config, fn, args, nullptr), "cuLaunchKernelEx");
  if (with_pdl) note_pdl_launch(config.hStream);
}

}  // namespace inductor_moe

extern "C" __attribute__((visibility("default"))) void inductor_moe_set_compiler(inductor_moe::CompileFn fn) {
  std::lock_guard<std::mutex> lock(inductor_moe::g_mutex);
  inductor_moe::g_compile = fn;
}
