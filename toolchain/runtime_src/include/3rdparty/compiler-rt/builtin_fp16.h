/*
 * socc: a stand-in for TVM's 3rdparty/compiler-rt/builtin_fp16.h (not in the apache-tvm wheel).
 *
 * Generic IEEE-754 binary conversions between formats given by their bit layout, used by
 * src/runtime/builtin_fp16.cc for __gnu_f2h_ieee, __gnu_h2f_ieee and __truncdfhf2:
 *   __truncXfYf2__<SrcT, SrcRep, SRC_SIG_BITS, DstT, DstRep, DST_SIG_BITS>(a)   narrower result,
 *                                                                              round to nearest even
 *   __extendXfYf2__<SrcT, SrcRep, SRC_SIG_BITS, DstT, DstRep, DST_SIG_BITS>(a)  wider result (exact)
 * Rep is the unsigned integer of the same width as T (T may itself be that integer, as for half).
 * Infinities and signed zeros are kept, NaNs stay (quiet) NaNs, subnormals are handled both ways.
 */
#ifndef SOCC_BUILTIN_FP16_H_
#define SOCC_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

namespace socc_fp {

/*! \brief An IEEE binary format: `Rep` holds the bits, SIG_BITS fraction bits below the exponent. */
template <typename Rep, int SIG_BITS>
struct Format {
  static constexpr int kBits = static_cast<int>(sizeof(Rep) * 8);
  static constexpr int kExpBits = kBits - SIG_BITS - 1;
  static constexpr uint64_t kExpMax = (uint64_t{1} << kExpBits) - 1;  // all-ones exponent field
  static constexpr int64_t kBias = static_cast<int64_t>(kExpMax >> 1);
  static constexpr uint64_t kSigMask = (uint64_t{1} << SIG_BITS) - 1;
  static constexpr uint64_t kImplicit = uint64_t{1} << SIG_BITS;

  static uint64_t Sign(uint64_t bits) { return bits >> (kBits - 1); }
  static uint64_t Exp(uint64_t bits) { return (bits >> SIG_BITS) & kExpMax; }
  static uint64_t Pack(uint64_t sign, uint64_t exp_and_sig) {
    return (sign << (kBits - 1)) | exp_and_sig;
  }
};

template <typename To, typename From>
inline To BitCast(From v) {
  static_assert(sizeof(To) == sizeof(From), "sizes differ");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

/*! \brief x / 2^shift rounded to nearest, ties to even (shift < 64). */
inline uint64_t ShiftRightRoundEven(uint64_t x, int shift) {
  if (shift <= 0) return x;
  uint64_t q = x >> shift;
  uint64_t rem = x & ((uint64_t{1} << shift) - 1);
  uint64_t half = uint64_t{1} << (shift - 1);
  if (rem > half || (rem == half && (q & 1) != 0)) ++q;
  return q;
}

/*! \brief Significand with its leading one at bit SIG_BITS, and the unbiased exponent. */
template <typename F>
inline void Normalize(uint64_t bits, uint64_t* sig, int64_t* exp) {
  uint64_t e = F::Exp(bits);
  *sig = bits & F::kSigMask;
  if (e == 0) {  // subnormal: no implicit one, exponent of the smallest normal
    *exp = 1 - F::kBias;
    while ((*sig & F::kImplicit) == 0) {
      *sig <<= 1;
      --*exp;
    }
  } else {
    *sig |= F::kImplicit;
    *exp = static_cast<int64_t>(e) - F::kBias;
  }
}

}  // namespace socc_fp

template <typename src_t, typename src_rep_t, int SRC_SIG_BITS, typename dst_t, typename dst_rep_t,
          int DST_SIG_BITS>
static inline dst_t __truncXfYf2__(src_t a) {
  using S = socc_fp::Format<src_rep_t, SRC_SIG_BITS>;
  using D = socc_fp::Format<dst_rep_t, DST_SIG_BITS>;
  const uint64_t bits = socc_fp::BitCast<src_rep_t>(a);
  const uint64_t sign = S::Sign(bits);
  uint64_t out;
  if (S::Exp(bits) == S::kExpMax) {  // infinity or NaN (kept quiet, top payload bits kept)
    uint64_t frac = bits & S::kSigMask;
    uint64_t nan = frac != 0 ? (D::kImplicit >> 1) | (frac >> (SRC_SIG_BITS - DST_SIG_BITS)) : 0;
    out = (D::kExpMax << DST_SIG_BITS) | (nan & D::kSigMask);
  } else if ((bits & ~(uint64_t{1} << (S::kBits - 1))) == 0) {  // signed zero
    out = 0;
  } else {
    uint64_t sig;
    int64_t exp;
    socc_fp::Normalize<S>(bits, &sig, &exp);
    int64_t biased = exp + D::kBias;
    if (biased >= static_cast<int64_t>(D::kExpMax)) {
      out = D::kExpMax << DST_SIG_BITS;  // too large: infinity
    } else if (biased > 0) {
      // Normal: the rounded significand keeps its leading one, which adds into the exponent
      // field; a carry out of rounding therefore moves up one binade (or to infinity) by itself.
      uint64_t rounded = socc_fp::ShiftRightRoundEven(sig, SRC_SIG_BITS - DST_SIG_BITS);
      out = (static_cast<uint64_t>(biased - 1) << DST_SIG_BITS) + rounded;
    } else {
      // Subnormal (or zero) result: exponent field 0, shift further by the missing exponent.
      int64_t shift = SRC_SIG_BITS - DST_SIG_BITS + (1 - biased);
      out = shift > SRC_SIG_BITS + 1 ? 0 : socc_fp::ShiftRightRoundEven(sig, static_cast<int>(shift));
    }
  }
  return socc_fp::BitCast<dst_t>(static_cast<dst_rep_t>(D::Pack(sign, out)));
}

template <typename src_t, typename src_rep_t, int SRC_SIG_BITS, typename dst_t, typename dst_rep_t,
          int DST_SIG_BITS>
static inline dst_t __extendXfYf2__(src_t a) {
  using S = socc_fp::Format<src_rep_t, SRC_SIG_BITS>;
  using D = socc_fp::Format<dst_rep_t, DST_SIG_BITS>;
  const uint64_t bits = socc_fp::BitCast<src_rep_t>(a);
  const uint64_t sign = S::Sign(bits);
  const uint64_t frac = bits & S::kSigMask;
  uint64_t out;
  if (S::Exp(bits) == S::kExpMax) {  // infinity or NaN (payload kept, made quiet)
    uint64_t nan = frac != 0 ? (D::kImplicit >> 1) : 0;
    out = (D::kExpMax << DST_SIG_BITS) | nan | (frac << (DST_SIG_BITS - SRC_SIG_BITS));
  } else if (S::Exp(bits) == 0 && frac == 0) {  // signed zero
    out = 0;
  } else {  // every finite value of the narrower format is a normal value of the wider one
    uint64_t sig;
    int64_t exp;
    socc_fp::Normalize<S>(bits, &sig, &exp);
    uint64_t biased = static_cast<uint64_t>(exp + D::kBias);
    out = (biased << DST_SIG_BITS) | ((sig << (DST_SIG_BITS - SRC_SIG_BITS)) & D::kSigMask);
  }
  return socc_fp::BitCast<dst_t>(static_cast<dst_rep_t>(D::Pack(sign, out)));
}

#endif  // SOCC_BUILTIN_FP16_H_
