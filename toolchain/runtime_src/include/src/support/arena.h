/*
 * socc: a stand-in for TVM's src/support/arena.h: a bump allocator whose memory is released all
 * at once (the RPC endpoint and the minimal RPC server use it for per-call scratch memory).
 */
#ifndef TVM_SUPPORT_ARENA_H_
#define TVM_SUPPORT_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <new>

namespace tvm {
namespace support {

/*! \brief Header at the start of each page; the usable bytes follow it. */
struct ArenaPageHeader {
  ArenaPageHeader* next;
  size_t size;    // bytes in the page, header included
  size_t offset;  // first free byte, counted from the start of the page
};

/*! \brief Pages from operator new, at least kPageSize bytes each. */
class SimplePageAllocator {
 public:
  static constexpr size_t kPageSize = 4096;

  ArenaPageHeader* allocate(size_t min_size) {
    size_t size = (min_size + kPageSize - 1) / kPageSize * kPageSize;
    auto* page = static_cast<ArenaPageHeader*>(::operator new(size));
    page->size = size;
    page->offset = sizeof(ArenaPageHeader);
    return page;
  }
  void deallocate(ArenaPageHeader* page) { ::operator delete(page); }
};

/*! \brief Arena over pages from `PageAllocator` (allocate(min_size), deallocate(page)). */
template <typename PageAllocator>
class GenericArena {
 public:
  explicit GenericArena(PageAllocator alloc = PageAllocator()) : alloc_(alloc) {}
  GenericArena(const GenericArena&) = delete;
  GenericArena& operator=(const GenericArena&) = delete;
  ~GenericArena() { FreeAll(); }

  /*! \brief Uninitialized room for `count` objects of trivial type T. */
  template <typename T>
  T* allocate_(int count) {
    return static_cast<T*>(Alloc(sizeof(T) * static_cast<size_t>(count), alignof(T)));
  }

  void* Alloc(size_t size, size_t align = alignof(std::max_align_t)) {
    if (void* p = BumpFrom(used_, size, align)) return p;
    // Start a new page: a recycled one if it is big enough, else a fresh one.
    ArenaPageHeader* page = free_;
    if (page != nullptr && page->size - page->offset >= size + align) {
      free_ = page->next;
    } else {
      page = alloc_.allocate(sizeof(ArenaPageHeader) + size + align);
    }
    page->next = used_;
    used_ = page;
    return BumpFrom(page, size, align);
  }

  /*! \brief Forgets every allocation but keeps the pages for reuse. */
  void RecycleAll() {
    while (used_ != nullptr) {
      ArenaPageHeader* page = used_;
      used_ = page->next;
      page->offset = sizeof(ArenaPageHeader);
      page->next = free_;
      free_ = page;
    }
  }

  /*! \brief Returns every page to the page allocator. */
  void FreeAll() {
    RecycleAll();
    while (free_ != nullptr) {
      ArenaPageHeader* page = free_;
      free_ = page->next;
      alloc_.deallocate(page);
    }
  }

 private:
  static void* BumpFrom(ArenaPageHeader* page, size_t size, size_t align) {
    if (page == nullptr) return nullptr;
    uintptr_t base = reinterpret_cast<uintptr_t>(page);
    uintptr_t start = (base + page->offset + align - 1) / align * align;
    if (start + size > base + page->size) return nullptr;
    page->offset = start + size - base;
    return reinterpret_cast<void*>(start);
  }

  PageAllocator alloc_;
  ArenaPageHeader* used_ = nullptr;  // pages handed out since the last recycle, newest first
  ArenaPageHeader* free_ = nullptr;  // recycled pages
};

using Arena = GenericArena<SimplePageAllocator>;

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_ARENA_H_
