// The reader_teacher CPU kernel, compiled once per instruction-set level by distill_cpu.cpp (each inclusion inside
// its own namespace under `#pragma GCC target`), so that every path can be forced and tested on one machine
// (csrc/cpu_isa.h). No include guard: included once per level, on purpose. Design and byte counts: distill_cpu.cpp.

// exp(x) for x <= 0 (arguments are x - max): Cody-Waite range reduction and a degree-6 polynomial, relative error
// ~2e-7, branch-free so the block loop vectorises. Below -87 (and for -inf) it returns 0; NaN stays NaN (the row's sum
// then turns NaN and the row is dropped, as in the reference), without converting NaN to an int on the way.
static inline float exp_nonpos(float x) {
  const bool under = x < -87.0f;
  const bool nan = x != x;
  const float xc = (under || nan) ? -87.0f : x;
  const float fn = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - fn * 0.693145751953125f) - fn * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return under ? 0.0f : (nan ? x : p * scale);
}

float block_max(const float* __restrict x, int n) {
  float m = NEG_INF;
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] <- exp(x[j] - m), returns the sum.
float block_exp_sum(float* __restrict x, int n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < n; ++j) {
    const float e = exp_nonpos(x[j] - m);
    x[j] = e;
    s += e;
  }
  return s;
}

// Validity of a block: x[j] keeps its value where doc >= 0 (and mask), else `fill`; dj[j] = doc or -1. Returns the
// number of valid tokens. Branch-free so it vectorises.
int apply_valid(float* __restrict x, int32_t* __restrict dj, const int32_t* __restrict d, const uint8_t* __restrict mk,
                int n, float fill) {
  int cnt = 0;
  if (mk != nullptr) {
#pragma omp simd reduction(+ : cnt)
    for (int j = 0; j < n; ++j) {
      const bool ok = (d[j] >= 0) & (mk[j] != 0);
      x[j] = ok ? x[j] : fill;
      dj[j] = ok ? d[j] : -1;
      cnt += ok;
    }
  } else {
#pragma omp simd reduction(+ : cnt)
    for (int j = 0; j < n; ++j) {
      const bool ok = d[j] >= 0;
      x[j] = ok ? x[j] : fill;
      dj[j] = ok ? d[j] : -1;
      cnt += ok;
    }
  }
  return cnt;
}

// Range [lo, hi] of the valid document ids in a block (hi = -1 when none).
void doc_range(const int32_t* __restrict dj, int n, int32_t* lo, int32_t* hi) {
  int32_t l = std::numeric_limits<int32_t>::max(), h = -1;
#pragma omp simd reduction(min : l) reduction(max : h)
  for (int j = 0; j < n; ++j) {
    l = std::min(l, dj[j] >= 0 ? dj[j] : std::numeric_limits<int32_t>::max());
    h = std::max(h, dj[j]);
  }
  *lo = l;
  *hi = h;
}

// sum of x[j] over the tokens of document k: a vectorised masked sum (no store-to-load chain on one bin).
float doc_sum(const float* __restrict x, const int32_t* __restrict dj, int n, int32_t k) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < n; ++j) s += dj[j] == k ? x[j] : 0.0f;
  return s;
}

// bf16 -> fp32 of a contiguous block: a 16-bit shift per element, vectorised.
void bf16_block(const uint16_t* __restrict src, float* __restrict dst, int n) {
  for (int j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(src[j]) << 16;
    std::memcpy(dst + j, &u, 4);
  }
}

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) { return bf16_to_float(v.v); }
inline float to_float(F16 v) { return half_to_float(v.v); }

// x[0:nb] = fp32 of row[(s0 + j) * ss]: vectorised for contiguous bf16/fp32 rows, element by element otherwise.
template <typename T>
inline void load_block(const T* row, int64_t s0, int64_t ss, float* x, int nb) {
  for (int j = 0; j < nb; ++j) x[j] = to_float(row[(s0 + j) * ss]);
}
template <>
inline void load_block<BF16>(const BF16* row, int64_t s0, int64_t ss, float* x, int nb) {
  if (ss == 1) {
    bf16_block(reinterpret_cast<const uint16_t*>(row + s0), x, nb);
    return;
  }
  for (int j = 0; j < nb; ++j) x[j] = to_float(row[(s0 + j) * ss]);
}
template <>
inline void load_block<float>(const float* row, int64_t s0, int64_t ss, float* x, int nb) {
  if (ss == 1) {
    std::memcpy(x, row + s0, static_cast<size_t>(nb) * 4);
    return;
  }
  for (int j = 0; j < nb; ++j) x[j] = row[(s0 + j) * ss];
}

template <typename T>
void reader_teacher_rows(const T* attn, int64_t B, int64_t L, int64_t H, int64_t Tn, int64_t S, int64_t sb,
                         int64_t sl, int64_t sh, int64_t st, int64_t ss, const int32_t* doc, const uint8_t* mask,
                         int64_t n, bool is_logits, float* out) {
  const int64_t R = L * H * Tn;
  int n_threads = 1;
#ifdef REATT_WITH_OPENMP
  n_threads = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(std::max<int64_t>(1, B * R))));
#endif
  std::vector<std::vector<double>> acc(n_threads);
#pragma omp parallel num_threads(n_threads)
  {
    int tid = 0;
#ifdef REATT_WITH_OPENMP
    tid = omp_get_thread_num();
#endif
    std::vector<double>& a = acc[tid];
    a.assign(static_cast<size_t>(B * n), 0.0);
    std::vector<float> bins(static_cast<size_t>(n), 0.0f);
    alignas(64) float x[BLOCK];
    int32_t dj[BLOCK];
#pragma omp for schedule(static)
    for (int64_t idx = 0; idx < B * R; ++idx) {
      const int64_t b = idx / R, r = idx % R;
      const int64_t l = r / (H * Tn), h = (r / Tn) % H, t = r % Tn;
      const T* row = attn + b * sb + l * sl + h * sh + t * st;
      const int32_t* drow = doc + b * S;
      const uint8_t* mrow = mask ? mask + b * S : nullptr;
      float m = NEG_INF, z = 0.0f;
      for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
        const int nb = static_cast<int>(std::min<int64_t>(BLOCK, S - s0));
        load_block(row, s0, ss, x, nb);
        if (apply_valid(x, dj, drow + s0, mrow ? mrow + s0 : nullptr, nb, is_logits ? NEG_INF : 0.0f) == 0) continue;
        if (is_logits) {
          const float bm = block_max(x, nb);
          if (bm == NEG_INF) continue;  // only -inf logits in this block: they add exp(-inf) = 0
          if (bm > m) {  // rescale this row's sums to the new max
            const float alpha = m == NEG_INF ? 0.0f : exp_nonpos(m - bm);
            z *= alpha;
            for (int64_t k = 0; k < n; ++k) bins[k] *= alpha;
            m = bm;
          }
          z += block_exp_sum(x, nb, m);
        } else {
          for (int j = 0; j < nb; ++j) z += x[j];
        }
        // FiD concatenates documents, so a block usually spans 1-3 of them: one masked vector sum per document;
        // any other layout falls back to a scalar scatter.
        int32_t lo, hi;
        doc_range(dj, nb, &lo, &hi);
        if (hi >= 0 && hi - lo < 4) {
          for (int32_t k = lo; k <= hi; ++k) bins[k] += doc_sum(x, dj, nb, k);
        } else {
          for (int j = 0; j < nb; ++j)
            if (dj[j] >= 0) bins[dj[j]] += x[j];
        }
      }
      double* ab = a.data() + b * n;
      // A row with no valid token, no mass, or a NaN/+inf at a valid token (z NaN or inf) contributes 0.
      if (z > 0.0f && z < std::numeric_limits<float>::infinity()) {
        const double inv = 1.0 / static_cast<double>(z);
        for (int64_t k = 0; k < n; ++k) ab[k] += bins[k] * inv;
      }
      std::fill(bins.begin(), bins.end(), 0.0f);
    }
  }
  const double inv_r = 1.0 / static_cast<double>(std::max<int64_t>(R, 1));
  for (int64_t i = 0; i < B * n; ++i) {
    double s = 0.0;
    for (int th = 0; th < n_threads; ++th)
      if (!acc[th].empty()) s += acc[th][i];
    out[i] = static_cast<float>(s * inv_r);
  }
}

