// A size-class caching CPU allocator, installed only around long scoring loops.
//
// Why: a greedy run rebuilds the network every round with new channel counts, so the same tail
// allocates thousands of large temporaries of sizes it never asked for before. glibc's allocator
// then searches a heap fragmented by the earlier rounds' sizes: measured on ResNet-20's global
// run, `_int_malloc` took 0.30 CPU-s of a late round after two warm rounds and 0.72 CPU-s after
// nine different rounds (perf, session 14), while the convolutions did not slow. This cache
// keeps freed blocks of >= kMinBytes in free lists keyed by a size class (8 classes per octave,
// so at most 1/8 of a block is slack) and hands them back without touching the heap, the way
// the CUDA caching allocator keeps device blocks.
//
// Contract:
//   * `install()` makes this the process's CPU allocator (c10::SetCPUAllocator) and remembers
//     the one it replaced; `uninstall()` restores that one and frees every cached block. Calls
//     nest: only the outermost install/uninstall pair switches allocators.
//   * Blocks smaller than kMinBytes are never cached: they come from c10::alloc_cpu, as the
//     default CPU allocator's do (glibc's per-thread caches are fast for those).
//   * A block freed while the cache holds more than `limit` bytes, or after `uninstall()`, is
//     returned to the system at once: tensors that outlive the cache never leak.
//   * Every block is a plain c10::alloc_cpu block, as the default CPU allocator's are, so a
//     block may be freed through either allocator: code that took the allocator before
//     `install()` and frees after it (or the reverse) stays correct. The cache knows its own
//     blocks by address (a map from address to size class, cleared by `uninstall()`); an
//     address it does not know is freed with c10::free_cpu.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace carprune {
namespace {

constexpr size_t kMinBytes = 4096;  // below this glibc's own caches are fast: not cached

// The smallest size of the form (8 + k) * 2^(e-3), k in [0, 8), that holds n: 8 classes per
// octave.
size_t size_class(size_t n) {
  const int e = 63 - __builtin_clzll(static_cast<unsigned long long>(n));  // 2^e <= n
  const size_t step = size_t{1} << (e - 3);
  return (n + step - 1) / step * step;
}

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* block = nullptr;
    size_t cls = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (active_ && n >= kMinBytes) {
        cls = size_class(n);
        auto it = free_.find(cls);
        if (it != free_.end() && !it->second.empty()) {
          block = it->second.back();
          it->second.pop_back();
          cached_ -= cls;
          ++hits_;
        } else {
          ++misses_;
        }
      }
    }
    if (block == nullptr) {
      block = c10::alloc_cpu(cls > 0 ? cls : n);
      if (cls > 0) {
        std::lock_guard<std::mutex> g(mu_);
        owned_[block] = cls;
      }
    }
    return {block, block, &BlockCache::release_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: blocks may outlive exit
    return *cache;
  }

  void install(size_t limit) {
    std::lock_guard<std::mutex> g(mu_);
    if (depth_++ > 0) return;
    limit_ = limit;
    previous_ = c10::GetCPUAllocator();
    active_ = true;
    hits_ = misses_ = 0;
    peak_ = 0;
    c10::SetCPUAllocator(this, kPriority);
  }

  void uninstall() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      TORCH_CHECK(depth_ > 0, "carprune block cache: uninstall() without install()");
      if (--depth_ > 0) return;
      c10::SetCPUAllocator(previous_, kPriority);
      active_ = false;
      for (auto& [cls, blocks] : free_) drop.insert(drop.end(), blocks.begin(), blocks.end());
      free_.clear();
      owned_.clear();
      cached_ = 0;
    }
    for (void* b : drop) c10::free_cpu(b);
  }

  pybind11::dict stats() {
    std::lock_guard<std::mutex> g(mu_);
    pybind11::dict d;
    d["installed"] = depth_ > 0;
    d["cached_bytes"] = cached_;
    d["hits"] = hits_;
    d["misses"] = misses_;
    d["peak_cached_bytes"] = peak_;
    d["limit_bytes"] = limit_;
    return d;
  }

 private:
  // SetCPUAllocator replaces the current allocator only at an equal or higher priority; the
  // restore in uninstall() uses the same value, so the replaced allocator comes back.
  static constexpr uint8_t kPriority = 100;

  static void release_block(void* block) {
    BlockCache& self = instance();
    {
      std::lock_guard<std::mutex> g(self.mu_);
      auto it = self.owned_.find(block);
      if (it != self.owned_.end()) {
        const size_t cls = it->second;
        if (self.active_ && self.cached_ + cls <= self.limit_) {
          self.free_[cls].push_back(block);
          self.cached_ += cls;
          self.peak_ = std::max(self.peak_, self.cached_);
          return;
        }
        self.owned_.erase(it);
      }
    }
    c10::free_cpu(block);
  }

  std::mutex mu_;
  bool active_ = false;
  int depth_ = 0;
  c10::Allocator* previous_ = nullptr;
  size_t limit_ = 0, cached_ = 0, peak_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;  // size class -> free blocks
  std::unordered_map<void*, size_t> owned_;              // the cache's blocks -> size class
};

}  // namespace

void bind_block_cache(pybind11::module_& m) {
  m.def("block_cache_install", [](size_t limit) { BlockCache::instance().install(limit); },
        pybind11::arg("limit_bytes"),
        "Make the size-class block cache the CPU allocator (nested calls count).");
  m.def("block_cache_uninstall", [] { BlockCache::instance().uninstall(); },
        "Restore the replaced CPU allocator and free every cached block (outermost call).");
  m.def("block_cache_stats", [] { return BlockCache::instance().stats(); },
        "{'installed', 'cached_bytes', 'peak_cached_bytes', 'hits', 'misses', 'limit_bytes'}: "
        "counts since the last outermost install.");
}

}  // namespace carprune
