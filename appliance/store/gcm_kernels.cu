// AES-256-GCM decryption of a stored model's chunks on the GPU they are loaded onto: the CTR
// keystream and the GHASH of the ciphertext, checked against the stored tags.
//
// Compiled by NVRTC at run time (no toolkit needed: torch ships libnvrtc), and as plain C by
// the tests, which run the same per-lane code on the CPU against `cryptography`.
//
// Layout of the work: chunk i has c 16-byte blocks; `lanes` threads share it, lane t taking
// blocks t, t+lanes, t+2*lanes, ... (coalesced loads). GHASH is a polynomial in H, so each lane
// evaluates its own blocks by Horner's rule in H^lanes and multiplies the result by the power of
// H its last block needs; the lanes' results XOR together into the chunk's accumulator. The
// associated data, the length block and E(J0) are added when the chunk is checked.
// Blocks are handled as big-endian 128-bit values (hi = bytes 0..7), as NIST SP 800-38D writes.

#ifdef __CUDACC__
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;
#define DEV __device__ __forceinline__
#else
#include <stdint.h>
#include <string.h>
typedef uint32_t u32;
typedef uint64_t u64;
typedef uint8_t u8;
#define DEV static inline
#endif

typedef struct {
    u64 hi, lo;
} u128;

DEV u32 bswap32(u32 x) {
    return (x >> 24) | ((x >> 8) & 0xff00u) | ((x << 8) & 0xff0000u) | (x << 24);
}

DEV u64 bswap64(u64 x) { return ((u64)bswap32((u32)x) << 32) | bswap32((u32)(x >> 32)); }

// Multiplication in GF(2^128) with GCM's bit order (SP 800-38D, algorithm 1).
DEV u128 gf_mult(u128 x, u128 y) {
    u128 z = {0, 0};
    u128 v = y;
    for (int i = 0; i < 128; i++) {
        u64 bit = i < 64 ? (x.hi >> (63 - i)) & 1 : (x.lo >> (127 - i)) & 1;
        u64 mask = (u64)0 - bit;
        z.hi ^= v.hi & mask;
        z.lo ^= v.lo & mask;
        u64 carry = v.lo & 1;
        v.lo = (v.lo >> 1) | (v.hi << 63);
        v.hi = (v.hi >> 1) ^ (((u64)0 - carry) & 0xE100000000000000ull);
    }
    return z;
}

// x * Y with a table of Y's products (512 entries of hi, lo): entry 16 * p + v is the product
// of Y and nibble v at position p of x (position 0 the most significant). Multiplication is
// linear in x, so 32 lookups replace 128 shift-and-add steps: the inner loop of GHASH.
DEV u128 gf_mult_table(u128 x, const u64* t) {
    u128 z = {0, 0};
    for (int p = 0; p < 16; p++) {
        u64 k = 2 * (16 * p + ((x.hi >> (60 - 4 * p)) & 0xf));
        z.hi ^= t[k];
        z.lo ^= t[k + 1];
    }
    for (int p = 0; p < 16; p++) {
        u64 k = 2 * (16 * (p + 16) + ((x.lo >> (60 - 4 * p)) & 0xf));
        z.hi ^= t[k];
        z.lo ^= t[k + 1];
    }
    return z;
}

// Entry k (0..511) of Y's product table (see gf_mult_table).
DEV u128 mult_table_entry(u128 y, int k) {
    int p = k / 16;
    u64 v = (u64)(k % 16);
    u128 x = {0, 0};
    if (p < 16)
        x.hi = v << (60 - 4 * p);
    else
        x.lo = v << (60 - 4 * (p - 16));
    return gf_mult(x, y);
}

// h^e for e >= 0 (h^0 is GCM's one: the block with only its first bit set).
DEV u128 gf_pow(u128 h, u64 e) {
    u128 result = {0x8000000000000000ull, 0};
    u128 base = h;
    while (e) {
        if (e & 1) result = gf_mult(result, base);
        base = gf_mult(base, base);
        e >>= 1;
    }
    return result;
}

// One AES-256 block encryption with T-tables (t0..t3: the round tables, sbox: S-box as words),
// on big-endian words; rk holds the 60 words of the expanded key.
DEV void aes256(const u32* rk, const u32* t0, const u32* t1, const u32* t2, const u32* t3,
                const u32* sbox, u32 in0, u32 in1, u32 in2, u32 in3, u32* out) {
    u32 s0 = in0 ^ rk[0], s1 = in1 ^ rk[1], s2 = in2 ^ rk[2], s3 = in3 ^ rk[3];
    for (int r = 1; r < 14; r++) {
        const u32* k = rk + 4 * r;
        u32 a = t0[s0 >> 24] ^ t1[(s1 >> 16) & 0xff] ^ t2[(s2 >> 8) & 0xff] ^ t3[s3 & 0xff] ^ k[0];
        u32 b = t0[s1 >> 24] ^ t1[(s2 >> 16) & 0xff] ^ t2[(s3 >> 8) & 0xff] ^ t3[s0 & 0xff] ^ k[1];
        u32 c = t0[s2 >> 24] ^ t1[(s3 >> 16) & 0xff] ^ t2[(s0 >> 8) & 0xff] ^ t3[s1 & 0xff] ^ k[2];
        u32 d = t0[s3 >> 24] ^ t1[(s0 >> 16) & 0xff] ^ t2[(s1 >> 8) & 0xff] ^ t3[s2 & 0xff] ^ k[3];
        s0 = a;
        s1 = b;
        s2 = c;
        s3 = d;
    }
    const u32* k = rk + 56;
    out[0] = (sbox[s0 >> 24] << 24) ^ (sbox[(s1 >> 16) & 0xff] << 16) ^
             (sbox[(s2 >> 8) & 0xff] << 8) ^ sbox[s3 & 0xff] ^ k[0];
    out[1] = (sbox[s1 >> 24] << 24) ^ (sbox[(s2 >> 16) & 0xff] << 16) ^
             (sbox[(s3 >> 8) & 0xff] << 8) ^ sbox[s0 & 0xff] ^ k[1];
    out[2] = (sbox[s2 >> 24] << 24) ^ (sbox[(s3 >> 16) & 0xff] << 16) ^
             (sbox[(s0 >> 8) & 0xff] << 8) ^ sbox[s1 & 0xff] ^ k[2];
    out[3] = (sbox[s3 >> 24] << 24) ^ (sbox[(s0 >> 16) & 0xff] << 16) ^
             (sbox[(s1 >> 8) & 0xff] << 8) ^ sbox[s2 & 0xff] ^ k[3];
}

// The 16 bytes at p as four little-endian words (what a plain load gives) and back.
DEV void load16(const u8* p, u32* w) {
#ifdef __CUDACC__
    uint4 v = *(const uint4*)p;
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
#else
    memcpy(w, p, 16);
#endif
}

DEV void store16(u8* p, const u32* w) {
#ifdef __CUDACC__
    *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]);
#else
    memcpy(p, w, 16);
#endif
}

// Decrypt lane t's blocks of one chunk in place; return the lane's share of the chunk's GHASH
// (zero for a lane with no block). n0..n2: the chunk's 96-bit nonce as big-endian words.
// hl_table: the product table of H^lanes.
DEV u128 lane_work(u8* chunk, u64 c_blocks, u64 lane, u64 lanes, u32 n0, u32 n1, u32 n2,
                   const u32* rk, const u32* t0, const u32* t1, const u32* t2, const u32* t3,
                   const u32* sbox, const u64* hl_table, u128 power) {
    u128 y = {0, 0};
    if (lane >= c_blocks) return y;
    for (u64 j = lane; j < c_blocks; j += lanes) {
        u32 w[4], ks[4];
        load16(chunk + 16 * j, w);
        y = gf_mult_table(y, hl_table);
        y.hi ^= ((u64)bswap32(w[0]) << 32) | bswap32(w[1]);
        y.lo ^= ((u64)bswap32(w[2]) << 32) | bswap32(w[3]);
        aes256(rk, t0, t1, t2, t3, sbox, n0, n1, n2, (u32)(j + 2), ks);  // counter of block j
        for (int q = 0; q < 4; q++) w[q] ^= bswap32(ks[q]);
        store16(chunk + 16 * j, w);
    }
    return gf_mult(y, power);
}

// The power of H that lane t's Horner result needs: H^(c - j_last + 1).
DEV u128 lane_power(u128 h, u64 c_blocks, u64 lane, u64 lanes) {
    if (lane >= c_blocks) return gf_pow(h, 0);
    u64 j_last = lane + (c_blocks - 1 - lane) / lanes * lanes;
    return gf_pow(h, c_blocks - j_last + 1);
}

// The chunk's tag from its lanes' accumulated share: associated data and length block added,
// E(J0) applied. Returns 1 if it differs from the stored tag.
DEV int chunk_mismatch(u128 acc, const u8* aad, u64 aad_len, u64 c_blocks, u128 h, u32 n0,
                       u32 n1, u32 n2, const u32* rk, const u32* t0, const u32* t1,
                       const u32* t2, const u32* t3, const u32* sbox, const u8* tag) {
    u128 ya = {0, 0};
    for (u64 k = 0; k < (aad_len + 15) / 16; k++) {  // zero padded by the caller
        u64 hi = 0, lo = 0;
        for (int b = 0; b < 8; b++) hi = (hi << 8) | aad[16 * k + b];
        for (int b = 8; b < 16; b++) lo = (lo << 8) | aad[16 * k + b];
        ya.hi ^= hi;
        ya.lo ^= lo;
        ya = gf_mult(ya, h);
    }
    u128 x = gf_mult(ya, gf_pow(h, c_blocks + 1));
    u128 len = {aad_len * 8, c_blocks * 128};
    u128 lh = gf_mult(len, h);
    u32 e[4];
    aes256(rk, t0, t1, t2, t3, sbox, n0, n1, n2, 1, e);  // E(J0)
    u64 hi = acc.hi ^ x.hi ^ lh.hi ^ (((u64)e[0] << 32) | e[1]);
    u64 lo = acc.lo ^ x.lo ^ lh.lo ^ (((u64)e[2] << 32) | e[3]);
    u64 want_hi = 0, want_lo = 0;
    for (int b = 0; b < 8; b++) want_hi = (want_hi << 8) | tag[b];
    for (int b = 8; b < 16; b++) want_lo = (want_lo << 8) | tag[b];
    return (hi != want_hi) || (lo != want_lo);
}

#ifdef __CUDACC__

// Tables: rk (60 words), then t0..t3 (256 each), then the S-box (256): 1340 words in all.
#define TABLE_WORDS 1340

__device__ void load_tables(const u32* tables, u32* shared) {
    for (int i = threadIdx.x; i < TABLE_WORDS; i += blockDim.x) shared[i] = tables[i];
    __syncthreads();
}

// table[k] = entry k of Y's product table (512 threads).
extern "C" __global__ void gcm_mult_table(u64 y_hi, u64 y_lo, u64* table) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= 512) return;
    u128 y = {y_hi, y_lo};
    u128 e = mult_table_entry(y, k);
    table[2 * k] = e.hi;
    table[2 * k + 1] = e.lo;
}

// powers[t] = H^(c - j_last(t) + 1) for t < lanes.
extern "C" __global__ void gcm_lane_powers(u64 h_hi, u64 h_lo, u64 c_blocks, u64 lanes,
                                           u64* powers) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= lanes) return;
    u128 h = {h_hi, h_lo};
    u128 p = lane_power(h, c_blocks, t, lanes);
    powers[2 * t] = p.hi;
    powers[2 * t + 1] = p.lo;
}

// Chunks first..first+gridDim.y-1, each c_blocks long, starting at `data` (chunk_bytes apart).
// Grid: x covers the lanes (blockDim.x threads each), y the chunks.
extern "C" __global__ void gcm_decrypt(u8* data, u64 chunk_bytes, u64 c_blocks, u64 first,
                                       u32 file_no, u64 lanes, const u32* tables,
                                       const u64* hl_table, const u64* powers, u64* acc) {
    __shared__ u32 s[TABLE_WORDS];
    __shared__ u64 m[1024];
    for (int k = threadIdx.x; k < 1024; k += blockDim.x) m[k] = hl_table[k];
    load_tables(tables, s);
    u64 lane = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 i = first + blockIdx.y;
    u128 power = {powers[2 * lane], powers[2 * lane + 1]};
    u128 y = lane_work(data + blockIdx.y * chunk_bytes, c_blocks, lane, lanes, file_no,
                       (u32)(i >> 32), (u32)i, s, s + 60, s + 316, s + 572, s + 828, s + 1084,
                       m, power);
    // XOR the block's lanes together, then one atomic per warp.
    for (int off = 16; off > 0; off >>= 1) {
        y.hi ^= __shfl_xor_sync(0xffffffffu, y.hi, off);
        y.lo ^= __shfl_xor_sync(0xffffffffu, y.lo, off);
    }
    if ((threadIdx.x & 31) == 0 && (y.hi | y.lo)) {
        atomicXor(&acc[2 * i], y.hi);
        atomicXor(&acc[2 * i + 1], y.lo);
    }
}

// One thread per chunk of first..end-1: bad[i] = 1 where the tag does not match. blocks[i]
// holds chunk i's block count; aad holds each chunk's associated data, zero padded to aad_stride
// bytes.
extern "C" __global__ void gcm_check(const u64* acc, const u8* aad, const u64* aad_len,
                                     u64 aad_stride, const u64* blocks, u64 first, u64 end,
                                     u32 file_no, const u32* tables, u64 h_hi, u64 h_lo,
                                     const u8* tags, int* bad) {
    __shared__ u32 s[TABLE_WORDS];
    load_tables(tables, s);
    u64 i = first + (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= end) return;
    u128 h = {h_hi, h_lo};
    u128 a = {acc[2 * i], acc[2 * i + 1]};
    bad[i] = chunk_mismatch(a, aad + i * aad_stride, aad_len[i], blocks[i], h, file_no,
                            (u32)(i >> 32), (u32)i, s, s + 60, s + 316, s + 572, s + 828,
                            s + 1084, tags + 16 * i);
}

#else

// The same work on the CPU, for the tests: one chunk, every lane in turn.
void cpu_decrypt_chunk(u8* chunk, u64 c_blocks, u64 index, u32 file_no, u64 lanes,
                       const u32* tables, u64 h_hi, u64 h_lo, u64* acc) {
    u128 h = {h_hi, h_lo};
    u128 h_lanes = gf_pow(h, lanes);
    u64 table[1024];
    for (int k = 0; k < 512; k++) {
        u128 e = mult_table_entry(h_lanes, k);
        table[2 * k] = e.hi;
        table[2 * k + 1] = e.lo;
    }
    for (u64 t = 0; t < lanes; t++) {
        u128 p = lane_power(h, c_blocks, t, lanes);
        u128 y = lane_work(chunk, c_blocks, t, lanes, file_no, (u32)(index >> 32), (u32)index,
                           tables, tables + 60, tables + 316, tables + 572, tables + 828,
                           tables + 1084, table, p);
        acc[0] ^= y.hi;
        acc[1] ^= y.lo;
    }
}

int cpu_check_chunk(const u64* acc, const u8* aad, u64 aad_len, u64 c_blocks, u64 index,
                    u32 file_no, const u32* tables, u64 h_hi, u64 h_lo, const u8* tag) {
    u128 h = {h_hi, h_lo};
    u128 a = {acc[0], acc[1]};
    return chunk_mismatch(a, aad, aad_len, c_blocks, h, file_no, (u32)(index >> 32), (u32)index,
                          tables, tables + 60, tables + 316, tables + 572, tables + 828,
                          tables + 1084, tag);
}

void cpu_pow(u64 h_hi, u64 h_lo, u64 e, u64* out) {
    u128 h = {h_hi, h_lo};
    u128 p = gf_pow(h, e);
    out[0] = p.hi;
    out[1] = p.lo;
}

#endif
