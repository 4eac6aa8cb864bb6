// Which instruction sets this CPU runs, and which kernel table each family of ops uses. Every family (the
// indirect-K GEMMs and LSTM loop, the sparse int8 kernels, the fused low-rank product) registers here at load
// and switches ISA together, so FXREDUCE_ISA (read in fxreduce/native.py) and native.forced_isa cover all of
// fxreduce's ops. Included by the ops translation units only, which compile without ISA flags.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <string>
#include <vector>

// A table compiled only for x86 (the avx512 and avx2 units), or nullptr elsewhere.
#if defined(__x86_64__)
#define FXR_X86_TABLE(table) (&(table))
#else
#define FXR_X86_TABLE(table) nullptr
#endif

namespace fxreduce {
namespace native {

inline const std::vector<std::string>& isa_preference() {
  static const std::vector<std::string> names{"avx512", "avx2", "portable"};
  return names;
}

// Whether this CPU runs the kernels compiled for `name`.
inline bool isa_supported(const std::string& name) {
  if (name == "portable") return true;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#endif
  return false;
}

class IsaFamily {
 public:
  virtual ~IsaFamily() = default;
  virtual bool built_for(const std::string& name) const = 0;
  virtual void use(const std::string& name) = 0;
  static std::vector<IsaFamily*>& all() {
    static std::vector<IsaFamily*> families;
    return families;
  }
};

// One family's tables, one per ISA (nullptr where this build has none), and the one in use: the best this CPU runs.
template <typename Table>
class IsaTables final : public IsaFamily {
 public:
  IsaTables(const Table* avx512, const Table* avx2, const Table* portable)
      : avx512_(avx512), avx2_(avx2), portable_(portable) {
    for (const std::string& name : isa_preference())
      if (named(name)) {
        active_.store(named(name));
        break;
      }
    all().push_back(this);
  }
  const Table& active() const { return *active_.load(std::memory_order_relaxed); }
  bool built_for(const std::string& name) const override { return named(name) != nullptr; }
  void use(const std::string& name) override { active_.store(named(name)); }

 private:
  const Table* named(const std::string& name) const {
    if (!isa_supported(name)) return nullptr;
    if (name == "avx512") return avx512_;
    if (name == "avx2") return avx2_;
    if (name == "portable") return portable_;
    return nullptr;
  }
  const Table *avx512_, *avx2_, *portable_;
  std::atomic<const Table*> active_{nullptr};
};

// The ISAs every family can run on this CPU, best first.
inline std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const std::string& name : isa_preference()) {
    bool everywhere = isa_supported(name);
    for (const IsaFamily* family : IsaFamily::all()) everywhere = everywhere && family->built_for(name);
    if (everywhere) names.push_back(name);
  }
  return names;
}

// Switch every family to `name`.
inline void set_isa(const std::string& name) {
  const std::vector<std::string> available = supported_isas();
  bool found = false;
  for (const std::string& candidate : available) found = found || candidate == name;
  TORCH_CHECK(found, "fxreduce: ISA '", name, "' is not available on this CPU or build; available: ",
              c10::Join(", ", available));
  for (IsaFamily* family : IsaFamily::all()) family->use(name);
}

}  // namespace native
}  // namespace fxreduce
