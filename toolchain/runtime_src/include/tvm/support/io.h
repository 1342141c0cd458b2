/*
 * socc: a small stand-in for TVM's <tvm/support/io.h>, which the apache-tvm wheel does not ship.
 *
 * A byte stream with two raw virtual calls, plus typed helpers that go through Serializer<T>
 * (specialized in serializer.h and by TVM's own headers, e.g. vm/executable.h, metadata.h).
 */
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

class Stream;

/*! \brief Binary codec for T; `enabled` is true only for supported types. The second parameter
 *  lets partial specializations select on traits (arithmetic, enum). */
template <typename T, typename = void>
struct Serializer {
  static constexpr bool enabled = false;
};

class Stream {
 public:
  virtual ~Stream() = default;
  /*! \return the number of bytes actually read (fewer at the end of the data). */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \return the number of bytes actually written. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  // Subclasses overriding the raw calls must say `using Stream::Read; using Stream::Write;`.
  template <typename T>
  void Write(const T& value) {
    static_assert(Serializer<T>::enabled, "tvm::support::Serializer<T> is not defined for T");
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* out) {
    static_assert(Serializer<T>::enabled, "tvm::support::Serializer<T> is not defined for T");
    return Serializer<T>::Read(this, out);
  }
  template <typename T>
  void WriteArray(const T* values, size_t count) {
    for (size_t i = 0; i < count; ++i) Write<T>(values[i]);
  }
  template <typename T>
  bool ReadArray(T* values, size_t count) {
    for (size_t i = 0; i < count; ++i) {
      if (!Read<T>(values + i)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_IO_H_
