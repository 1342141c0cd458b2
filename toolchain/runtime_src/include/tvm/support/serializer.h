/*
 * socc: a small stand-in for TVM's <tvm/support/serializer.h>, which the apache-tvm wheel does
 * not ship.
 *
 * The byte layout must match what the (host) TVM compiler writes into exported modules:
 *   numbers        raw little-endian bytes (swapped on big-endian hosts)
 *   enums          as their underlying integer
 *   strings        uint64 length, then the bytes
 *   vector/Array   uint64 count, then each element
 *   pair           first, then second
 *   maps           uint64 count, then key/value pairs
 *   DLDataType     uint8 code, uint8 bits, uint16 lanes
 *   DLDevice       int32 device_type, int32 device_id
 */
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/endian.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_arithmetic_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& value) {
    T copy = value;
    if (!TVM_FFI_IO_NO_ENDIAN_SWAP) ffi::ByteSwap(&copy, sizeof(T), 1);
    strm->Write(&copy, sizeof(T));
  }
  static bool Read(Stream* strm, T* out) {
    if (strm->Read(out, sizeof(T)) != sizeof(T)) return false;
    if (!TVM_FFI_IO_NO_ENDIAN_SWAP) ffi::ByteSwap(out, sizeof(T), 1);
    return true;
  }
};

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_enum_v<T>>> {
  static constexpr bool enabled = true;
  using Int = std::underlying_type_t<T>;
  static void Write(Stream* strm, const T& value) {
    Serializer<Int>::Write(strm, static_cast<Int>(value));
  }
  static bool Read(Stream* strm, T* out) {
    Int raw;
    if (!Serializer<Int>::Read(strm, &raw)) return false;
    *out = static_cast<T>(raw);
    return true;
  }
};

namespace detail {
inline void WriteCount(Stream* strm, size_t n) {
  Serializer<uint64_t>::Write(strm, static_cast<uint64_t>(n));
}
inline bool ReadCount(Stream* strm, size_t* n) {
  uint64_t raw;
  if (!Serializer<uint64_t>::Read(strm, &raw)) return false;
  *n = static_cast<size_t>(raw);
  return true;
}
inline void WriteChars(Stream* strm, const char* data, size_t n) {
  WriteCount(strm, n);
  if (n != 0) strm->Write(data, n);
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::string& s) {
    detail::WriteChars(strm, s.data(), s.size());
  }
  static bool Read(Stream* strm, std::string* out) {
    size_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    out->resize(n);
    return n == 0 || strm->Read(&(*out)[0], n) == n;
  }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::String& s) {
    detail::WriteChars(strm, s.data(), s.size());
  }
  static bool Read(Stream* strm, ffi::String* out) {
    std::string s;
    if (!Serializer<std::string>::Read(strm, &s)) return false;
    *out = ffi::String(std::move(s));
    return true;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = true;
  // Numbers are stored back to back, so on little-endian hosts one raw copy does the job.
  static constexpr bool kRaw = std::is_arithmetic_v<T> && TVM_FFI_IO_NO_ENDIAN_SWAP;

  static void Write(Stream* strm, const std::vector<T>& values) {
    detail::WriteCount(strm, values.size());
    if constexpr (kRaw) {
      if (!values.empty()) strm->Write(values.data(), values.size() * sizeof(T));
    } else {
      for (const T& v : values) Serializer<T>::Write(strm, v);
    }
  }
  static bool Read(Stream* strm, std::vector<T>* out) {
    size_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    out->resize(n);
    if constexpr (kRaw) {
      return n == 0 || strm->Read(out->data(), n * sizeof(T)) == n * sizeof(T);
    } else {
      for (size_t i = 0; i < n; ++i) {
        if (!Serializer<T>::Read(strm, &(*out)[i])) return false;
      }
      return true;
    }
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::pair<A, B>& p) {
    Serializer<A>::Write(strm, p.first);
    Serializer<B>::Write(strm, p.second);
  }
  static bool Read(Stream* strm, std::pair<A, B>* out) {
    return Serializer<A>::Read(strm, &out->first) && Serializer<B>::Read(strm, &out->second);
  }
};

template <typename K, typename V>
struct Serializer<std::unordered_map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::unordered_map<K, V>& m) {
    detail::WriteCount(strm, m.size());
    for (const auto& kv : m) {
      Serializer<K>::Write(strm, kv.first);
      Serializer<V>::Write(strm, kv.second);
    }
  }
  static bool Read(Stream* strm, std::unordered_map<K, V>* out) {
    size_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    out->clear();
    for (size_t i = 0; i < n; ++i) {
      std::pair<K, V> kv;
      if (!Serializer<std::pair<K, V>>::Read(strm, &kv)) return false;
      out->insert(std::move(kv));
    }
    return true;
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Array<T>& values) {
    detail::WriteCount(strm, values.size());
    for (const T& v : values) Serializer<T>::Write(strm, v);
  }
  static bool Read(Stream* strm, ffi::Array<T>* out) {
    size_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    ffi::Array<T> values;
    for (size_t i = 0; i < n; ++i) {
      T v;
      if (!Serializer<T>::Read(strm, &v)) return false;
      values.push_back(std::move(v));
    }
    *out = std::move(values);
    return true;
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Map<K, V>& m) {
    detail::WriteCount(strm, m.size());
    for (const auto& kv : m) {
      Serializer<K>::Write(strm, kv.first);
      Serializer<V>::Write(strm, kv.second);
    }
  }
  static bool Read(Stream* strm, ffi::Map<K, V>* out) {
    size_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    ffi::Map<K, V> m;
    for (size_t i = 0; i < n; ++i) {
      K key;
      V value;
      if (!Serializer<K>::Read(strm, &key) || !Serializer<V>::Read(strm, &value)) return false;
      m.Set(std::move(key), std::move(value));
    }
    *out = std::move(m);
    return true;
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDataType& t) {
    Serializer<uint8_t>::Write(strm, t.code);
    Serializer<uint8_t>::Write(strm, t.bits);
    Serializer<uint16_t>::Write(strm, t.lanes);
  }
  static bool Read(Stream* strm, DLDataType* t) {
    return Serializer<uint8_t>::Read(strm, &t->code) && Serializer<uint8_t>::Read(strm, &t->bits) &&
           Serializer<uint16_t>::Read(strm, &t->lanes);
  }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDevice& d) {
    Serializer<int32_t>::Write(strm, static_cast<int32_t>(d.device_type));
    Serializer<int32_t>::Write(strm, d.device_id);
  }
  static bool Read(Stream* strm, DLDevice* d) {
    int32_t type;
    if (!Serializer<int32_t>::Read(strm, &type)) return false;
    d->device_type = static_cast<DLDeviceType>(type);
    return Serializer<int32_t>::Read(strm, &d->device_id);
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SERIALIZER_H_
