// A caching allocator for large host (CPU) tensors: best fit, split, coalesce (as CUDA's caching allocator
// does for device memory). Loaded and installed by structvae/host_memory.py through ctypes.
//
// Written by hand because torch's desktop builds have no CPU caching allocator, and glibc's heap, told to
// keep freed blocks, fragments to 2.4x the live peak on a checkpointed 218x178 SOS-VAE step (#11).
//
// Requests of at least `threshold` bytes are rounded up to a multiple of `granule` and served from
// segments obtained with c10::alloc_cpu. A freed block goes back to its segment and merges with free
// neighbours; a request takes the smallest free block that fits and leaves the rest free. Smaller
// requests go to the allocator that was in place before (c10's default). Memory stays with the process
// until structvae_host_allocator_release() gives back the segments that are wholly free.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <set>
#include <tuple>
#include <unordered_map>

namespace {

struct Block {
  char* ptr;
  size_t size;
  bool free;
  Block* prev;  // neighbours inside the same segment
  Block* next;
};

struct BySizeThenAddress {
  bool operator()(const Block* a, const Block* b) const {
    return std::tie(a->size, a->ptr) < std::tie(b->size, b->ptr);
  }
};

struct Stats {
  size_t allocated = 0, reserved = 0, peak_allocated = 0, peak_reserved = 0;
};

void deleter(void* ptr);

class CachingHostAllocator final : public c10::Allocator {
 public:
  CachingHostAllocator(c10::Allocator* fallback, size_t threshold, size_t granule)
      : fallback_(fallback), threshold_(threshold), granule_(granule) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < threshold_) {
      return fallback_->allocate(nbytes);
    }
    const size_t size = (nbytes + granule_ - 1) / granule_ * granule_;
    Block* block;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      block = take(size);
      live_.emplace(block->ptr, block);
      stats_.allocated += block->size;
      stats_.peak_allocated = std::max(stats_.peak_allocated, stats_.allocated);
    }
    report(block->ptr, static_cast<int64_t>(block->size));
    return {block->ptr, block->ptr, &deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &deleter;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void free(void* ptr) {
    int64_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(static_cast<char*>(ptr));
      if (it != live_.end()) {
        Block* block = it->second;
        live_.erase(it);
        size = static_cast<int64_t>(block->size);
        stats_.allocated -= block->size;
        give_back(block);
      }
    }
    if (size == 0) {  // a small block: the fallback's (raw_deallocate sends every pointer here)
      fallback_->raw_deleter()(ptr);
    } else {
      report(ptr, -size);
    }
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    return release_locked();
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  void reset_peaks() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.peak_allocated = stats_.allocated;
    stats_.peak_reserved = stats_.reserved;
  }

  // fork(): the child gets the allocator in a consistent state (DataLoader workers fork).
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  Block* take(size_t size) {
    Block key{nullptr, size, true, nullptr, nullptr};
    auto it = free_.lower_bound(&key);
    Block* block;
    if (it != free_.end()) {
      block = *it;
      free_.erase(it);
      if (block->size - size >= granule_) {  // split: the tail stays free
        Block* rest = new Block{block->ptr + size, block->size - size, true, block, block->next};
        if (block->next != nullptr) {
          block->next->prev = rest;
        }
        block->next = rest;
        block->size = size;
        free_.insert(rest);
      }
    } else {
      block = new Block{new_segment(size), size, true, nullptr, nullptr};
      stats_.reserved += size;
      stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
    }
    block->free = false;
    return block;
  }

  size_t release_locked() {
    size_t released = 0;
    for (auto it = free_.begin(); it != free_.end();) {
      Block* block = *it;
      if (block->prev == nullptr && block->next == nullptr) {  // a whole segment
        it = free_.erase(it);
        released += block->size;
        c10::free_cpu(block->ptr);
        delete block;
      } else {
        ++it;
      }
    }
    stats_.reserved -= released;
    return released;
  }

  char* new_segment(size_t size) {
    try {
      return static_cast<char*>(c10::alloc_cpu(size));
    } catch (const c10::Error&) {  // out of memory: give back the free segments, then try once more
      release_locked();
      return static_cast<char*>(c10::alloc_cpu(size));
    }
  }

  void give_back(Block* block) {
    block->free = true;
    if (block->next != nullptr && block->next->free) {
      block = absorb_next(block);
    }
    if (block->prev != nullptr && block->prev->free) {
      block = absorb_next(block->prev);
    }
    free_.insert(block);
  }

  // `left` takes in its right-hand neighbour, both free. Whichever of them is in the free set leaves it
  // before its size (the set's key) changes; erasing the one that is not is a no-op (addresses are unique).
  Block* absorb_next(Block* left) {
    Block* right = left->next;
    free_.erase(left);
    free_.erase(right);
    left->size += right->size;
    left->next = right->next;
    if (right->next != nullptr) {
      right->next->prev = left;
    }
    delete right;
    return left;
  }

  void report(void* ptr, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      Stats now = stats();
      c10::reportMemoryUsageToProfiler(ptr, delta, now.allocated, now.reserved,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  c10::Allocator* fallback_;
  const size_t threshold_, granule_;
  std::mutex mutex_;
  std::set<Block*, BySizeThenAddress> free_;
  std::unordered_map<char*, Block*> live_;
  Stats stats_;
};

CachingHostAllocator* instance = nullptr;  // never destroyed: tensors may outlive static destructors

void deleter(void* ptr) {
  instance->free(ptr);
}

}  // namespace

extern "C" {

// Installs the allocator for CPU tensors; 1 if this call installed it, 0 if it already was.
int structvae_host_allocator_install(size_t threshold, size_t granule) {
  if (instance != nullptr) {
    return 0;
  }
  instance = new CachingHostAllocator(c10::GetCPUAllocator(), threshold, granule);
  pthread_atfork([] { instance->lock(); }, [] { instance->unlock(); }, [] { instance->unlock(); });
  c10::SetCPUAllocator(instance, /*priority=*/UINT8_MAX);
  return 1;
}

// allocated, reserved, peak allocated, peak reserved (bytes); zeros before install.
void structvae_host_allocator_stats(size_t* out) {
  Stats s = instance != nullptr ? instance->stats() : Stats{};
  out[0] = s.allocated;
  out[1] = s.reserved;
  out[2] = s.peak_allocated;
  out[3] = s.peak_reserved;
}

void structvae_host_allocator_reset_peaks() {
  if (instance != nullptr) {
    instance->reset_peaks();
  }
}

// Frees the segments that hold no live tensor; returns the bytes given back.
size_t structvae_host_allocator_release() {
  return instance != nullptr ? instance->release() : 0;
}

}  // extern "C"
