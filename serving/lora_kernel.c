/* Loraplex's LoRA rows kernel for vLLM's CPU build (float32), loaded by serving/lora_kernel.py.
 *
 * For each LoRA row r of a batch and each part p (an output slice of a module with its own A
 * and B): y[r, off_p : off_p + size_p] += ((scale * x[r] @ A_p[slot]^T) @ Bt_p[slot]), where
 * slot is the adapter slot of row r. Rows come sorted by slot, in groups (slot, start, count)
 * into `rows`; rows not listed (base rows) are never read or written.
 *
 * One call per module instead of ~20 small torch ops: on a decode step (16 rows, 8 distinct
 * adapters) the per-op dispatch and thread wake-ups cost more than the arithmetic. The work is
 * split into items of at most CHUNK rows of one group, run in parallel on the OpenMP runtime
 * the process already has (torch's: this library is linked against libgomp.so.1 and loaded
 * after torch, so the same thread pool serves both). An item reads its slot's A and B once
 * for all its rows.
 *
 * Layouts: A_p is (slots, rank, in) with row stride `in`; Bt_p is B transposed, (slots, rank,
 * bt_stride_p), the first size_p columns used; x and y rows are contiguous. Activations are
 * float32 (the replica's dtype); the weights float32, or float16 / bfloat16 where the
 * replica keeps its LoRA weights so (`--lora-dtype`): half the bytes a decode step reads for
 * them, which is what bounds it with 8 distinct adapters.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RANK 64
#define CHUNK 8

/* Weight element types: float32, float16 (_Float16) and bfloat16 (the top half of a float32),
 * each read as float32; the arithmetic is float32 throughout. */
typedef _Float16 f16_t;
typedef uint16_t bf16_t;
static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_f16(const f16_t *p, int64_t i) { return (float)p[i]; }
static inline float load_bf16(const bf16_t *p, int64_t i)
{
    uint32_t bits = (uint32_t)p[i] << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* item_part_<T>: one item (<= CHUNK rows of one slot), one part. */
#define ITEM_PART(NAME, T, LOAD)                                                                \
    static void NAME(int64_t count, const int64_t *rows, const float *x, int64_t x_stride,      \
                     int64_t in, float *y, int64_t y_stride, const T *a, int64_t rank,          \
                     const T *bt, int64_t bt_stride, int64_t size, float scale)                 \
    {                                                                                           \
        float h[CHUNK][MAX_RANK];                                                               \
        for (int64_t k = 0; k < rank; k++) {                                                    \
            const T *ak = a + k * in;                                                           \
            for (int64_t r = 0; r < count; r++) {                                               \
                const float *xr = x + rows[r] * x_stride;                                       \
                float acc = 0.f;                                                                \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t j = 0; j < in; j++)         \
                    acc += xr[j] * LOAD(ak, j);                                                 \
                h[r][k] = acc * scale;                                                          \
            }                                                                                   \
        }                                                                                       \
        for (int64_t r = 0; r < count; r++) {                                                   \
            float *yr = y + rows[r] * y_stride;                                                 \
            for (int64_t k = 0; k < rank; k++) {                                                \
                const float hk = h[r][k];                                                       \
                const T *bk = bt + k * bt_stride;                                               \
                _Pragma("omp simd") for (int64_t o = 0; o < size; o++)                          \
                    yr[o] += hk * LOAD(bk, o);                                                  \
            }                                                                                   \
        }                                                                                       \
    }

ITEM_PART(item_part_f32, float, load_f32)
ITEM_PART(item_part_f16, f16_t, load_f16)
ITEM_PART(item_part_bf16, bf16_t, load_bf16)

/* Weight dtypes, as lora_kernel.py passes them. */
enum { W_F32 = 0, W_F16 = 1, W_BF16 = 2 };

/* Returns 0, or -1 (nothing written) for a rank over MAX_RANK, an unknown weight type, or
 * no memory. a_slot_strides / bt_slot_strides / bt_strides are in elements. */
int loraplex_lora_rows_f32(int64_t ngroups, const int64_t *groups, const int64_t *rows,
                           const float *x, int64_t x_stride, int64_t in, float *y,
                           int64_t y_stride, int64_t nparts, const int64_t *a_ptrs,
                           const int64_t *a_slot_strides, const int64_t *bt_ptrs,
                           const int64_t *bt_slot_strides, const int64_t *bt_strides,
                           const int64_t *offsets, const int64_t *sizes, int64_t rank,
                           float scale, int threads, int wtype)
{
    if (rank > MAX_RANK || rank < 1 || wtype < W_F32 || wtype > W_BF16)
        return -1;
    int64_t nitems = 0;
    for (int64_t g = 0; g < ngroups; g++)
        nitems += (groups[3 * g + 2] + CHUNK - 1) / CHUNK;
    int64_t *items = malloc(sizeof(int64_t) * 3 * (nitems > 0 ? nitems : 1));
    if (items == NULL)
        return -1;
    int64_t n = 0;
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t slot = groups[3 * g], start = groups[3 * g + 1], count = groups[3 * g + 2];
        for (int64_t c = 0; c < count; c += CHUNK) {
            items[3 * n] = slot;
            items[3 * n + 1] = start + c;
            items[3 * n + 2] = count - c < CHUNK ? count - c : CHUNK;
            n++;
        }
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && nitems > 1)
    for (int64_t i = 0; i < nitems; i++) {
        int64_t slot = items[3 * i], start = items[3 * i + 1], count = items[3 * i + 2];
        for (int64_t p = 0; p < nparts; p++) {
            int64_t a_off = slot * a_slot_strides[p], b_off = slot * bt_slot_strides[p];
            float *yp = y + offsets[p];
            const int64_t *r = rows + start;
            if (wtype == W_F32)
                item_part_f32(count, r, x, x_stride, in, yp, y_stride,
                              (const float *)(intptr_t)a_ptrs[p] + a_off, rank,
                              (const float *)(intptr_t)bt_ptrs[p] + b_off, bt_strides[p],
                              sizes[p], scale);
            else if (wtype == W_F16)
                item_part_f16(count, r, x, x_stride, in, yp, y_stride,
                              (const f16_t *)(intptr_t)a_ptrs[p] + a_off, rank,
                              (const f16_t *)(intptr_t)bt_ptrs[p] + b_off, bt_strides[p],
                              sizes[p], scale);
            else
                item_part_bf16(count, r, x, x_stride, in, yp, y_stride,
                               (const bf16_t *)(intptr_t)a_ptrs[p] + a_off, rank,
                               (const bf16_t *)(intptr_t)bt_ptrs[p] + b_off, bt_strides[p],
                               sizes[p], scale);
        }
    }
    free(items);
    return 0;
}
