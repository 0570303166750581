// sha256.cpp — SHA-256 (FIPS 180-4) of artifact files, for the integrity check at open: the manifest
// lists every file's digest, and devices have no common crypto library to ask (Android exposes none).
// The CPU's SHA-256 instructions do the rounds where it has them (x86 SHA-NI, ARMv8 SHA2: about 5x the
// portable code, as fast as OpenSSL's hashing in the Python runtime); the portable rounds elsewhere.
#include <cstdio>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <arm_neon.h>
#include <sys/auxv.h>
#endif

#include "g4c.h"
#include "internal.h"

namespace g4c {
namespace {

constexpr uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
    0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
    0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
    0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void compress(uint32_t state[8], const uint8_t *block) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = uint32_t(block[4 * i]) << 24 | uint32_t(block[4 * i + 1]) << 16 | uint32_t(block[4 * i + 2]) << 8 | block[4 * i + 3];
  for (int i = 16; i < 64; ++i) {
    uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = state[0], b = state[1], c = state[2], d = state[3], e = state[4], f = state[5], g = state[6], h = state[7];
  for (int i = 0; i < 64; ++i) {
    uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
    uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  state[0] += a; state[1] += b; state[2] += c; state[3] += d;
  state[4] += e; state[5] += f; state[6] += g; state[7] += h;
}

#if defined(__x86_64__)
bool has_sha_instructions() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29));  // CPUID.7.0:EBX.SHA
}

// 4 rounds per step; state kept as ABEF / CDGH, the layout sha256rnds2 works on
__attribute__((target("sha,sse4.1,ssse3"))) void compress_fast(uint32_t state[8], const uint8_t *data, size_t blocks) {
  const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(&state[0])), 0xB1);
  __m128i state1 = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(&state[4])), 0x1B);
  __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);
  state1 = _mm_blend_epi16(state1, tmp, 0xF0);
  for (; blocks; --blocks, data += 64) {
    const __m128i abef = state0, cdgh = state1;
    __m128i m[4];
    for (int g = 0; g < 16; ++g) {
      if (g < 4) {
        m[g] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i *>(data + 16 * g)), swap);
      } else {  // W[4g..4g+3] from the previous 16 words
        __m128i w = _mm_add_epi32(_mm_sha256msg1_epu32(m[g % 4], m[(g + 1) % 4]),
                                  _mm_alignr_epi8(m[(g + 3) % 4], m[(g + 2) % 4], 4));
        m[g % 4] = _mm_sha256msg2_epu32(w, m[(g + 3) % 4]);
      }
      __m128i msg = _mm_add_epi32(m[g % 4], _mm_loadu_si128(reinterpret_cast<const __m128i *>(&K[4 * g])));
      state1 = _mm_sha256rnds2_epu32(state1, state0, msg);
      state0 = _mm_sha256rnds2_epu32(state0, state1, _mm_shuffle_epi32(msg, 0x0E));
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);
  }
  tmp = _mm_shuffle_epi32(state0, 0x1B);
  state1 = _mm_shuffle_epi32(state1, 0xB1);
  _mm_storeu_si128(reinterpret_cast<__m128i *>(&state[0]), _mm_blend_epi16(tmp, state1, 0xF0));
  _mm_storeu_si128(reinterpret_cast<__m128i *>(&state[4]), _mm_alignr_epi8(state1, tmp, 8));
}
#elif defined(__aarch64__) && defined(__linux__)
bool has_sha_instructions() { return getauxval(AT_HWCAP) & (1ul << 6); }  // HWCAP_SHA2

__attribute__((target("arch=armv8-a+crypto"))) void compress_fast(uint32_t state[8], const uint8_t *data, size_t blocks) {
  uint32x4_t state0 = vld1q_u32(&state[0]), state1 = vld1q_u32(&state[4]);
  for (; blocks; --blocks, data += 64) {
    const uint32x4_t abcd = state0, efgh = state1;
    uint32x4_t m[4];
    for (int g = 0; g < 16; ++g) {
      if (g < 4) {
        m[g] = vreinterpretq_u32_u8(vrev32q_u8(vld1q_u8(data + 16 * g)));
      } else {
        m[g % 4] = vsha256su1q_u32(vsha256su0q_u32(m[g % 4], m[(g + 1) % 4]), m[(g + 2) % 4], m[(g + 3) % 4]);
      }
      const uint32x4_t msg = vaddq_u32(m[g % 4], vld1q_u32(&K[4 * g]));
      const uint32x4_t previous = state0;
      state0 = vsha256hq_u32(state0, state1, msg);
      state1 = vsha256h2q_u32(state1, previous, msg);
    }
    state0 = vaddq_u32(state0, abcd);
    state1 = vaddq_u32(state1, efgh);
  }
  vst1q_u32(&state[0], state0);
  vst1q_u32(&state[4], state1);
}
#else
bool has_sha_instructions() { return false; }
void compress_fast(uint32_t *, const uint8_t *, size_t) {}
#endif

void compress_blocks(uint32_t state[8], const uint8_t *data, size_t blocks) {
  static const bool fast = has_sha_instructions();
  if (fast) {
    compress_fast(state, data, blocks);
    return;
  }
  for (size_t b = 0; b < blocks; ++b) compress(state, data + 64 * b);
}

}  // namespace

std::string sha256_file(const std::string &path, uint64_t *size) {
  FILE *f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error(G4C_ERR_ARTIFACT, "cannot read " + path);
  uint32_t state[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::vector<uint8_t> buffer(1 << 20);
  uint64_t total = 0;
  size_t n = 0, pending = 0;  // bytes of a partial block left at the buffer's start
  while ((n = std::fread(buffer.data() + pending, 1, buffer.size() - pending, f)) > 0) {
    total += n;
    size_t have = pending + n, full = have / 64 * 64;
    compress_blocks(state, buffer.data(), full / 64);
    pending = have - full;
    std::memmove(buffer.data(), buffer.data() + full, pending);
  }
  std::fclose(f);
  uint8_t tail[128] = {0};
  std::memcpy(tail, buffer.data(), pending);
  tail[pending] = 0x80;
  size_t blocks = pending + 9 <= 64 ? 1 : 2;
  uint64_t bits = total * 8;
  for (int i = 0; i < 8; ++i) tail[blocks * 64 - 1 - i] = uint8_t(bits >> (8 * i));
  compress_blocks(state, tail, blocks);
  static const char *hex = "0123456789abcdef";
  std::string out;
  for (uint32_t word : state)
    for (int shift = 28; shift >= 0; shift -= 4) out += hex[(word >> shift) & 15];
  if (size) *size = total;
  return out;
}

}  // namespace g4c
