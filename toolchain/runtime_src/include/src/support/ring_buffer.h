/*
 * socc: a stand-in for TVM's src/support/ring_buffer.h: a growable FIFO byte queue (the RPC
 * endpoint's read and write buffers).
 */
#ifndef TVM_SUPPORT_RING_BUFFER_H_
#define TVM_SUPPORT_RING_BUFFER_H_

#include <tvm/ffi/error.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  /*! \return the number of bytes queued. */
  size_t bytes_available() const { return size_; }

  /*! \brief Grows the storage (keeping the queued bytes) to hold at least n bytes. */
  void Reserve(size_t n) {
    if (n <= buf_.size()) return;
    std::vector<char> bigger(std::max({n, buf_.size() * 2, size_t{1024}}));
    CopyOut(bigger.data(), size_);
    buf_.swap(bigger);
    head_ = 0;
  }

  /*! \brief Removes `size` queued bytes into `data`. */
  void Read(void* data, size_t size) {
    TVM_FFI_ICHECK_LE(size, size_) << "RingBuffer: reading more bytes than are queued";
    CopyOut(static_cast<char*>(data), size);
    Pop(size);
  }

  /*! \brief Appends `size` bytes. */
  void Write(const void* data, size_t size) {
    Reserve(size_ + size);
    const char* src = static_cast<const char*>(data);
    while (size != 0) {
      size_t n = std::min(size, FreeChunk());
      std::memcpy(buf_.data() + Tail(), src, n);
      size_ += n;
      src += n;
      size -= n;
    }
  }

  /*!
   * \brief Hands up to max_nbytes queued bytes (one contiguous piece) to
   *  `f(const void* data, size_t size) -> size_t consumed` and drops what it consumed.
   */
  template <typename F>
  size_t ReadWithCallback(F f, size_t max_nbytes) {
    size_t n = std::min({max_nbytes, size_, buf_.size() - head_});
    if (n == 0) return 0;
    size_t done = f(static_cast<const void*>(buf_.data() + head_), n);
    Pop(done);
    return done;
  }

  /*!
   * \brief Lets `f(void* data, size_t size) -> size_t produced` fill up to max_nbytes
   *  (one contiguous piece) and queues what it produced.
   */
  template <typename F>
  size_t WriteWithCallback(F f, size_t max_nbytes) {
    Reserve(size_ + max_nbytes);
    if (size_ == 0) head_ = 0;  // an empty buffer can offer all of its room in one piece
    size_t n = std::min(max_nbytes, FreeChunk());
    if (n == 0) return 0;
    size_t done = f(static_cast<void*>(buf_.data() + Tail()), n);
    size_ += done;
    return done;
  }

 private:
  size_t Tail() const { return (head_ + size_) % buf_.size(); }
  /*! \brief The contiguous free bytes starting at Tail(). */
  size_t FreeChunk() const {
    if (size_ == buf_.size()) return 0;
    size_t tail = Tail();
    return tail >= head_ ? buf_.size() - tail : head_ - tail;
  }
  void CopyOut(char* dst, size_t n) const {
    size_t first = std::min(n, buf_.size() - head_);
    if (first != 0) std::memcpy(dst, buf_.data() + head_, first);
    if (n > first) std::memcpy(dst + first, buf_.data(), n - first);
  }
  void Pop(size_t n) {
    head_ = size_ == n ? 0 : (head_ + n) % buf_.size();
    size_ -= n;
  }

  std::vector<char> buf_;
  size_t head_ = 0;  // index of the oldest queued byte
  size_t size_ = 0;  // bytes queued
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_RING_BUFFER_H_
