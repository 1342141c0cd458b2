/* socc's freestanding C runtime for Hexagon model executables run under qemu-hexagon.
 *
 * Debian has no Hexagon libc, so a model executable is linked with -nostdlib against this file
 * and the driver socc generates (model_driver.c). It gives the kernels TVM compiled what they
 * call outside themselves:
 *   - _start, exit and write/read/open by the Linux syscall trap (trap0(#1), number in r6);
 *   - memcpy/memmove/memset (and the Hexagon compiler's memcpy helper);
 *   - a stack-like workspace allocator set into the kernels' __TVMBackendAllocWorkspace and
 *     __TVMBackendFreeWorkspace pointers (TVM frees workspace in reverse order of allocation);
 *   - TVMFFIErrorSetRaisedFromCStrParts, which prints the kernel's error on stderr;
 *   - the float math the kernels call: nearbyintf, expf, logf, powf, sqrtf, tanhf, erff,
 *     fmodf (float only: the Hexagon soft double routines are not linked);
 *   - the compiler's helpers (compiler-rt is not in Debian for Hexagon): float division and square
 *     root, 32- and 64-bit integer division.
 * The driver defines socc_main(argc, argv).
 */
#include <stddef.h>
#include <stdint.h>

int socc_main(int argc, char** argv);

/* ------------------------------------------------------------------ syscalls */

enum { SYS_openat = 56, SYS_close = 57, SYS_read = 63, SYS_write = 64, SYS_exit_group = 94 };
enum { AT_FDCWD = -100, O_RDONLY = 0, O_WRONLY_CREAT_TRUNC = 01 | 0100 | 01000 };

static long socc_syscall(long number, long a, long b, long c, long d) {
  register long r0 __asm__("r0") = a;
  register long r1 __asm__("r1") = b;
  register long r2 __asm__("r2") = c;
  register long r3 __asm__("r3") = d;
  register long r6 __asm__("r6") = number;
  __asm__ volatile("trap0(#1)" : "+r"(r0) : "r"(r1), "r"(r2), "r"(r3), "r"(r6) : "memory");
  return r0;
}

void socc_exit(int code) {
  socc_syscall(SYS_exit_group, code, 0, 0, 0);
  for (;;) {
  }
}

/* The kernel starts a process with sp at argc, then argv[]. */
__asm__(
    ".text\n"
    ".globl _start\n"
    ".type _start,@function\n"
    "_start:\n"
    "  r0 = memw(r29+#0)\n"
    "  r1 = add(r29, #4)\n"
    "  r29 = and(r29, #-64)\n"
    "  r29 = add(r29, #-64)\n"
    "  call socc_start\n");

void socc_start(int argc, char** argv) { socc_exit(socc_main(argc, argv)); }

static size_t socc_strlen(const char* s) {
  size_t n = 0;
  while (s[n]) ++n;
  return n;
}

void socc_print(int fd, const char* text) { socc_syscall(SYS_write, fd, (long)text, (long)socc_strlen(text), 0); }

/* Reads exactly `size` bytes of file `path` into `dst`; returns 0, or -1 (missing, short, longer). */
int socc_read_file(const char* path, void* dst, size_t size) {
  long fd = socc_syscall(SYS_openat, AT_FDCWD, (long)path, O_RDONLY, 0);
  if (fd < 0) return -1;
  size_t done = 0;
  while (done < size) {
    long got = socc_syscall(SYS_read, fd, (long)((char*)dst + done), (long)(size - done), 0);
    if (got <= 0) break;
    done += (size_t)got;
  }
  char extra;
  long more = socc_syscall(SYS_read, fd, (long)&extra, 1, 0);
  socc_syscall(SYS_close, fd, 0, 0, 0);
  return (done == size && more == 0) ? 0 : -1;
}

int socc_write_file(const char* path, const void* src, size_t size) {
  long fd = socc_syscall(SYS_openat, AT_FDCWD, (long)path, O_WRONLY_CREAT_TRUNC, 0644);
  if (fd < 0) return -1;
  size_t done = 0;
  while (done < size) {
    long put = socc_syscall(SYS_write, fd, (long)((const char*)src + done), (long)(size - done), 0);
    if (put <= 0) break;
    done += (size_t)put;
  }
  socc_syscall(SYS_close, fd, 0, 0, 0);
  return done == size ? 0 : -1;
}

/* ------------------------------------------------------------------ memory */

void* memcpy(void* dst, const void* src, size_t n) {
  unsigned char* d = dst;
  const unsigned char* s = src;
  while (n--) *d++ = *s++;
  return dst;
}

void* memmove(void* dst, const void* src, size_t n) {
  unsigned char* d = dst;
  const unsigned char* s = src;
  if (d < s) {
    while (n--) *d++ = *s++;
  } else {
    while (n--) d[n] = s[n];
  }
  return dst;
}

void* memset(void* dst, int value, size_t n) {
  unsigned char* d = dst;
  while (n--) *d++ = (unsigned char)value;
  return dst;
}

void* __hexagon_memcpy_likely_aligned_min32bytes_mult8bytes(void* dst, const void* src, size_t n) {
  return memcpy(dst, src, n);
}

#ifndef SOCC_WORKSPACE_BYTES
#define SOCC_WORKSPACE_BYTES (64u << 20)
#endif
#define SOCC_WORKSPACE_DEPTH 64

static unsigned char socc_workspace[SOCC_WORKSPACE_BYTES] __attribute__((aligned(128)));
static size_t socc_workspace_top;
static size_t socc_workspace_marks[SOCC_WORKSPACE_DEPTH];
static int socc_workspace_depth;

static void* socc_alloc_workspace(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits) {
  (void)device_type, (void)device_id, (void)dtype_code, (void)dtype_bits;
  size_t start = (socc_workspace_top + 127u) & ~(size_t)127u;
  if (socc_workspace_depth == SOCC_WORKSPACE_DEPTH || nbytes > SOCC_WORKSPACE_BYTES - start) {
    socc_print(2, "socc runtime: kernel workspace exhausted\n");
    return NULL;
  }
  socc_workspace_marks[socc_workspace_depth++] = socc_workspace_top;
  socc_workspace_top = start + (size_t)nbytes;
  return socc_workspace + start;
}

static int socc_free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id, (void)ptr;
  if (socc_workspace_depth == 0) return -1;
  socc_workspace_top = socc_workspace_marks[--socc_workspace_depth];
  return 0;
}

/* Strong definitions: they take the place of the kernels' weak, null pointers. */
void* (*__TVMBackendAllocWorkspace)(int, int, uint64_t, int, int) = socc_alloc_workspace;
int (*__TVMBackendFreeWorkspace)(int, int, void*) = socc_free_workspace;

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  socc_print(2, kind);
  socc_print(2, ": ");
  for (int32_t i = 0; i < num_parts; ++i) socc_print(2, parts[i]);
  socc_print(2, "\n");
}

/* ------------------------------------------------------------------ float math (single precision) */

static float socc_bits_to_float(uint32_t bits) {
  union { uint32_t u; float f; } v = {bits};
  return v.f;
}

static uint32_t socc_float_bits(float x) {
  union { float f; uint32_t u; } v = {x};
  return v.u;
}

/* a / b, correctly rounded (round half to even), by exact integer long division of the significands:
 * the Hexagon compiler calls this for every float division, and the int8 results must match the host
 * bit for bit, so no reciprocal estimate. */
float __hexagon_divsf3(float a, float b) {
  uint32_t ua = socc_float_bits(a), ub = socc_float_bits(b);
  uint32_t sign = (ua ^ ub) & 0x80000000u;
  int ea = (int)((ua >> 23) & 0xff), eb = (int)((ub >> 23) & 0xff);
  uint32_t ma = ua & 0x7fffffu, mb = ub & 0x7fffffu;
  const uint32_t nan = 0x7fc00000u, inf = 0x7f800000u;
  if ((ea == 255 && ma) || (eb == 255 && mb)) return socc_bits_to_float(nan);
  if (ea == 255) return socc_bits_to_float(eb == 255 ? nan : sign | inf);
  if (eb == 255) return socc_bits_to_float(sign);
  if (eb == 0 && mb == 0) return socc_bits_to_float((ea == 0 && ma == 0) ? nan : sign | inf);
  if (ea == 0 && ma == 0) return socc_bits_to_float(sign);
  if (ea == 0) {
    while (!(ma & 0x800000u)) ma <<= 1, --ea;
    ++ea;
  } else {
    ma |= 0x800000u;
  }
  if (eb == 0) {
    while (!(mb & 0x800000u)) mb <<= 1, --eb;
    ++eb;
  } else {
    mb |= 0x800000u;
  }
  int e = ea - eb + 127; /* biased exponent of the quotient in [1, 2) */
  uint32_t r = ma, q = 0;
  if (r < mb) r <<= 1, --e;
  for (int i = 0; i < 25; ++i) { /* 1 integer bit, 23 fraction bits, 1 rounding bit */
    q <<= 1;
    if (r >= mb) r -= mb, q |= 1;
    r <<= 1;
  }
  int shift = 1 + (e <= 0 ? 1 - e : 0);
  if (shift > 26) return socc_bits_to_float(sign);
  uint32_t m = q >> shift, rest = q & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (r != 0 || (m & 1)))) ++m;
  if (e <= 0) return socc_bits_to_float(sign | m); /* subnormal (or rounded up to the smallest normal) */
  uint32_t bits = ((uint32_t)(e - 1) << 23) + m;
  return socc_bits_to_float(bits >= inf ? sign | inf : sign | bits);
}

float fabsf(float x) { return socc_bits_to_float(socc_float_bits(x) & 0x7fffffffu); }

/* Round half to even (the default rounding mode), as C's nearbyintf. */
float nearbyintf(float x) {
  const float two23 = 8388608.0f;
  float a = fabsf(x);
  if (!(a < two23)) return x; /* already integral, inf or nan */
  volatile float shifted = a + two23;
  float r = shifted - two23;
  return x < 0 ? -r : r;
}

float roundf(float x) {
  float a = fabsf(x);
  float r = nearbyintf(a);
  if (r - a == -0.5f) r += 1.0f; /* halves away from zero */
  return x < 0 ? -r : r;
}

float floorf(float x) {
  float r = nearbyintf(x);
  return r > x ? r - 1.0f : r;
}

float ceilf(float x) {
  float r = nearbyintf(x);
  return r < x ? r + 1.0f : r;
}

float truncf(float x) { return x < 0 ? ceilf(x) : floorf(x); }

float fmodf(float x, float y) { return x - truncf(x / y) * y; }

float sqrtf(float x) {
  if (x < 0) return socc_bits_to_float(0x7fc00000u);
  if (x == 0 || x != x || x > 3.0e38f) return x;
  /* 1/sqrt by the bit-level estimate, three Newton steps, then one correction of the square root. */
  float y = socc_bits_to_float(0x5f3759dfu - (socc_float_bits(x) >> 1));
  for (int i = 0; i < 3; ++i) y = y * (1.5f - 0.5f * x * y * y);
  float s = x * y;
  return s + 0.5f * y * (x - s * s);
}

float __hexagon_sqrtf(float x) { return sqrtf(x); }

/* Unsigned long division by shift and subtract; `remainder` may be NULL. */
static uint64_t socc_udivmod64(uint64_t n, uint64_t d, uint64_t* remainder) {
  uint64_t q = 0, r = 0;
  if (d == 0) {
    socc_print(2, "socc runtime: integer division by zero\n");
    socc_exit(3);
  }
  for (int i = 63; i >= 0; --i) {
    r = (r << 1) | ((n >> i) & 1);
    if (r >= d) r -= d, q |= (uint64_t)1 << i;
  }
  if (remainder) *remainder = r;
  return q;
}

uint64_t __hexagon_udivdi3(uint64_t n, uint64_t d) { return socc_udivmod64(n, d, NULL); }
uint64_t __hexagon_umoddi3(uint64_t n, uint64_t d) {
  uint64_t r;
  socc_udivmod64(n, d, &r);
  return r;
}
int64_t __hexagon_divdi3(int64_t n, int64_t d) {
  uint64_t q = socc_udivmod64(n < 0 ? -(uint64_t)n : (uint64_t)n, d < 0 ? -(uint64_t)d : (uint64_t)d, NULL);
  return (n < 0) != (d < 0) ? -(int64_t)q : (int64_t)q;
}
int64_t __hexagon_moddi3(int64_t n, int64_t d) { /* C semantics: the sign of the dividend */
  uint64_t r;
  socc_udivmod64(n < 0 ? -(uint64_t)n : (uint64_t)n, d < 0 ? -(uint64_t)d : (uint64_t)d, &r);
  return n < 0 ? -(int64_t)r : (int64_t)r;
}
uint32_t __hexagon_udivsi3(uint32_t n, uint32_t d) { return (uint32_t)__hexagon_udivdi3(n, d); }
uint32_t __hexagon_umodsi3(uint32_t n, uint32_t d) { return (uint32_t)__hexagon_umoddi3(n, d); }
int32_t __hexagon_divsi3(int32_t n, int32_t d) { return (int32_t)__hexagon_divdi3(n, d); }
int32_t __hexagon_modsi3(int32_t n, int32_t d) { return (int32_t)__hexagon_moddi3(n, d); }

float expf(float x) {
  if (x != x) return x;
  if (x > 88.72f) return socc_bits_to_float(0x7f800000u);
  if (x < -103.97f) return 0.0f;
  /* x = k ln2 + r, |r| <= ln2/2; ln2 split in two parts so k*ln2 is exact enough. */
  float k = nearbyintf(x * 1.44269504f);
  float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666418e-2f + r * (8.33336823e-3f + r * (1.38877297e-3f + r * 1.98423e-4f))))));
  int ki = (int)k;
  /* 2^k in two steps so subnormal results (k < -126) come out right. */
  int k1 = ki / 2, k2 = ki - k1;
  return p * socc_bits_to_float((uint32_t)(k1 + 127) << 23) * socc_bits_to_float((uint32_t)(k2 + 127) << 23);
}

float logf(float x) {
  if (x < 0 || x != x) return socc_bits_to_float(0x7fc00000u);
  if (x == 0) return socc_bits_to_float(0xff800000u);
  if (x > 3.4e38f) return x;
  uint32_t bits = socc_float_bits(x);
  int e = 0;
  if (bits < 0x00800000u) { /* subnormal */
    x *= 16777216.0f;
    e = -24;
    bits = socc_float_bits(x);
  }
  e += (int)(bits >> 23) - 127;
  float m = socc_bits_to_float((bits & 0x007fffffu) | 0x3f800000u); /* [1, 2) */
  if (m > 1.41421356f) {
    m *= 0.5f;
    e += 1;
  }
  /* log(m) = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716 */
  float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float t = s * (2.0f + s2 * (0.666666667f + s2 * (0.4f + s2 * (0.285714286f + s2 * (0.222222222f + s2 * 0.181818182f)))));
  return t + (float)e * 0.693147181f;
}

float powf(float x, float y) {
  if (y == 0) return 1.0f;
  float yi = nearbyintf(y);
  if (yi == y && fabsf(y) <= 64.0f) { /* integer exponent: repeated squaring (exact for y = 2) */
    int n = (int)fabsf(y);
    float result = 1.0f, base = x;
    while (n) {
      if (n & 1) result *= base;
      base *= base;
      n >>= 1;
    }
    return y < 0 ? 1.0f / result : result;
  }
  if (x < 0) return socc_bits_to_float(0x7fc00000u);
  return expf(y * logf(x));
}

float tanhf(float x) {
  float a = fabsf(x);
  float r;
  if (a < 0.625f) { /* tanh(a) = e / (e + 2), e = expm1(2a) by its series: no cancellation */
    float t = 2.0f * a, e = 0.0f;
    for (int k = 13; k >= 1; --k) e = t / (float)k * (1.0f + e);
    r = e / (e + 2.0f);
  } else if (a > 9.0f) {
    r = 1.0f;
  } else {
    r = 1.0f - 2.0f / (expf(2.0f * a) + 1.0f);
  }
  return x < 0 ? -r : r;
}

float erff(float x) {
  /* erf(x) = 1 - erfc(x); erfc by the rational Chebyshev fit of Numerical Recipes (erfcc), |err| < 1.2e-7. */
  float z = fabsf(x);
  if (z < 0.5f) { /* Taylor series near 0 keeps relative accuracy */
    float z2 = z * z;
    float s = z * (1.12837917f + z2 * (-0.376126389f + z2 * (0.112837917f + z2 * (-0.0268661706f + z2 * 0.00522397762f))));
    return x < 0 ? -s : s;
  }
  float t = 1.0f / (1.0f + 0.5f * z);
  float poly = -z * z - 1.26551223f +
               t * (1.00002368f + t * (0.37409196f + t * (0.09678418f + t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
  float r = 1.0f - t * expf(poly);
  return x < 0 ? -r : r;
}
