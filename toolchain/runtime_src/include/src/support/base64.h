/*
 * socc: a stand-in for TVM's src/support/base64.h: standard base64 (RFC 4648, '=' padding)
 * layered on another support::Stream. TVM stores tensors in JSON this way.
 */
#ifndef TVM_SUPPORT_BASE64_H_
#define TVM_SUPPORT_BASE64_H_

#include <tvm/ffi/error.h>
#include <tvm/support/io.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdint>

namespace tvm {
namespace support {

namespace base64 {
inline const char* Alphabet() {
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}
/*! \return the 6-bit value of a base64 digit, or -1. */
inline int Decode(int c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64

/*! \brief Encodes bytes as base64 text into `out`. Call Finish() once at the end. */
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}

  using Stream::Read;
  using Stream::Write;

  size_t Read(void*, size_t) override { return 0; }
  size_t Write(const void* ptr, size_t size) override {
    const auto* bytes = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[count_++] = bytes[i];
      if (count_ == 3) EmitGroup();
    }
    return size;
  }
  /*! \brief Writes the last partial group with '=' padding. */
  void Finish() {
    if (count_ != 0) EmitGroup();
  }

 private:
  void EmitGroup() {
    const char* digits = base64::Alphabet();
    uint32_t v = (uint32_t{group_[0]} << 16) | (uint32_t{group_[1]} << 8) | group_[2];
    char text[4] = {digits[(v >> 18) & 63], digits[(v >> 12) & 63], digits[(v >> 6) & 63],
                    digits[v & 63]};
    if (count_ < 3) text[3] = '=';
    if (count_ < 2) text[2] = '=';
    out_->Write(text, 4);
    count_ = 0;
    group_[0] = group_[1] = group_[2] = 0;
  }

  Stream* out_;
  uint8_t group_[3] = {0, 0, 0};
  int count_ = 0;
};

/*! \brief Decodes base64 text read from `in`. Call InitPosition() before the first Read. */
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}

  using Stream::Read;
  using Stream::Write;

  /*! \brief Skips whitespace before the encoded data. */
  void InitPosition() {
    do {
      lookahead_ = NextChar();
    } while (lookahead_ != EOF && std::isspace(lookahead_));
  }
  size_t Read(void* ptr, size_t size) override {
    auto* bytes = static_cast<uint8_t*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (pending_pos_ == pending_len_ && !DecodeGroup()) break;
      bytes[n++] = pending_[pending_pos_++];
    }
    return n;
  }
  size_t Write(const void*, size_t) override { return 0; }

 private:
  int NextChar() {
    char c;
    return in_->Read(&c, 1) == 1 ? static_cast<unsigned char>(c) : EOF;
  }
  /*! \brief Decodes four characters into up to three bytes; false at the end of the data. */
  bool DecodeGroup() {
    int chars[4];
    for (int& c : chars) {
      c = lookahead_;
      lookahead_ = NextChar();
    }
    if (chars[0] == EOF || std::isspace(chars[0]) || chars[0] == '"') return false;
    uint32_t v = 0;
    int len = 3;
    for (int i = 0; i < 4; ++i) {
      int d = base64::Decode(chars[i]);
      if (d < 0) {
        TVM_FFI_ICHECK(chars[i] == '=' && i >= 2) << "invalid base64 data";
        len = std::min(len, i - 1);
        d = 0;
      }
      v = (v << 6) | static_cast<uint32_t>(d);
    }
    pending_[0] = static_cast<uint8_t>(v >> 16);
    pending_[1] = static_cast<uint8_t>(v >> 8);
    pending_[2] = static_cast<uint8_t>(v);
    pending_len_ = len;
    pending_pos_ = 0;
    return len > 0;
  }

  Stream* in_;
  int lookahead_ = EOF;
  uint8_t pending_[3] = {0, 0, 0};
  int pending_len_ = 0;
  int pending_pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BASE64_H_
