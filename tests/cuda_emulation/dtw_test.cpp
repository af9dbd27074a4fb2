// Emulated test of the DTW CUDA kernels (dtw_kernels.cu compiled as C++, see cuda_runtime.h):
// forward values (kept R and value-only), backward E (soft: Cuturi & Blondel's Algorithm 2;
// hard: the backtracked path) and the fused soft backward's grad_x / grad_y against a
// double-precision loop of the spec, for fp32 and fp64,
// hard and soft, bands, per-pair lengths, the three cost paths (D = 1, D <= 4, any D), the
// precomputed cost, and 32-thread blocks so that pairs span several stripes of rows.
// Usage: dtw_test SEED (fresh random inputs per seed); exit status 0 when every case passes.
#include "cuda/kernels_cuda.h"
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include <string>
#include <cmath>
#include <limits>
#include <algorithm>
using namespace ether_kernels::cuda;
static const double INF = INFINITY;
std::mt19937_64 rng;
int failures = 0;

struct Case { int B, N, M, D; int64_t band; bool soft; double gamma; int metric; bool matrix; int threads; int soft_rows = 0; };

template <class T> void run(const Case& cs) {
  int B = cs.B, N = cs.N, M = cs.M, D = cs.D;
  std::normal_distribution<double> nd;
  std::vector<T> x(B * N * D), y(B * M * D);
  for (auto& v : x) v = (T)nd(rng);
  for (auto& v : y) v = (T)nd(rng);
  std::vector<int64_t> xl(B), yl(B);
  for (int b = 0; b < B; ++b) { xl[b] = b == 0 ? N : 1 + rng() % N; yl[b] = b == 0 ? M : 1 + rng() % M; }
  // cost (double, from the T values)
  std::vector<double> c(B * N * M);
  for (int b = 0; b < B; ++b) for (int i = 0; i < N; ++i) for (int j = 0; j < M; ++j) {
    double t = 0;
    for (int d = 0; d < D; ++d) { double df = (double)x[(b*N+i)*D+d] - (double)y[(b*M+j)*D+d]; t += cs.metric == 2 ? std::fabs(df) : df*df; }
    c[(b*N+i)*M+j] = cs.metric == 1 ? std::sqrt(t) : t;
  }
  std::vector<T> costT(B * N * M);
  for (size_t k = 0; k < c.size(); ++k) costT[k] = (T)c[k];
  if (cs.matrix) for (size_t k = 0; k < c.size(); ++k) c[k] = (double)costT[k];
  std::vector<T> grad(B);
  for (auto& g : grad) g = (T)(0.5 + (rng() % 100) / 100.0);
  // reference
  std::vector<double> val(B), E(B * N * M, 0.0);
  std::vector<std::vector<double>> Rref(B);
  for (int b = 0; b < B; ++b) {
    int n = xl[b], m = yl[b];
    int64_t lo = cs.band < 0 ? -10000 : -cs.band + std::min(0, m - n), hi = cs.band < 0 ? 10000 : cs.band + std::max(0, m - n);
    auto ok = [&](int i, int j) { return i >= 0 && i < n && j >= 0 && j < m && j - i >= lo && j - i <= hi; };
    std::vector<double> R((n + 1) * (m + 1), INF);
    auto Rat = [&](int i, int j) -> double& { return R[(i + 1) * (m + 1) + (j + 1)]; };
    Rat(-1, -1) = 0;
    for (int i = 0; i < n; ++i) for (int j = 0; j < m; ++j) {
      if (!ok(i, j)) continue;
      double a = Rat(i-1,j-1), u = Rat(i-1,j), l = Rat(i,j-1), mu = std::min({a,u,l}), best = mu;
      if (cs.soft && mu < INF) best = mu - cs.gamma * std::log(std::exp(-(a-mu)/cs.gamma) + std::exp(-(u-mu)/cs.gamma) + std::exp(-(l-mu)/cs.gamma));
      Rat(i, j) = c[(b*N+i)*M+j] + best;
    }
    val[b] = Rat(n-1, m-1);
    Rref[b] = R;
    double* Eb = &E[b*N*M];
    if (cs.soft) {
      for (int i = n - 1; i >= 0; --i) for (int j = m - 1; j >= 0; --j) {
        if (!ok(i, j)) continue;
        double e = 0;
        if (i == n-1 && j == m-1) e = 1;
        else if (Rat(i,j) < INF) {
          int si[3] = {i+1, i, i+1}, sj[3] = {j, j+1, j+1};
          for (int k = 0; k < 3; ++k) if (ok(si[k], sj[k]))
            e += Eb[si[k]*M+sj[k]] * std::exp((Rat(si[k],sj[k]) - c[(b*N+si[k])*M+sj[k]] - Rat(i,j)) / cs.gamma);
        }
        Eb[i*M+j] = e;
      }
      for (int k = 0; k < N*M; ++k) Eb[k] *= (double)grad[b];
    } else {
      int i = n-1, j = m-1;
      while (true) {
        Eb[i*M+j] = grad[b];
        if (i == 0 && j == 0) break;
        int mv = -1; double best = 0;
        if (ok(i-1,j-1)) { best = Rat(i-1,j-1); mv = 0; }
        if (ok(i-1,j) && (mv < 0 || Rat(i-1,j) < best)) { best = Rat(i-1,j); mv = 1; }
        if (ok(i,j-1) && (mv < 0 || Rat(i,j-1) < best)) { best = Rat(i,j-1); mv = 2; }
        if (mv != 2) --i; if (mv != 1) --j;
      }
    }
  }
  // kernels
  DtwArgs a{};
  a.cost = cs.matrix ? costT.data() : nullptr;
  a.x = x.data(); a.y = y.data(); a.x_batch_stride = N * D; a.y_batch_stride = M * D;
  a.dtype = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  a.B = B; a.N = N; a.M = M; a.D = D; a.x_lengths = xl.data(); a.y_lengths = yl.data();
  a.metric = cs.metric; a.band = cs.band; a.gamma = cs.gamma; a.soft = cs.soft; a.max_threads = cs.threads;
  a.soft_rows = cs.soft_rows;
  std::vector<char> ws(dtw_workspace_bytes(a) + 8);
  a.workspace = ws.data(); a.workspace_bytes = ws.size();
  std::vector<T> values(B);
  size_t vbytes = cs.soft ? 8 : sizeof(T);
  // R starts as NaN bytes: the forward must write every element (no zero fill needed).
  std::vector<char> Rk(B * dtw_kept_per_pair(a) * vbytes, char(0xFF));
  dtw_forward(a, values.data(), Rk.data(), nullptr);
  int64_t unwritten = 0;
  for (int64_t e = 0; e < B * dtw_kept_per_pair(a); ++e) {
    const double v = cs.soft || sizeof(T) == 8 ? reinterpret_cast<const double*>(Rk.data())[e]
                                               : reinterpret_cast<const float*>(Rk.data())[e];
    unwritten += std::isnan(v);
  }
  if (unwritten > 0) {
    std::printf("forward left %lld elements of the kept R unwritten  <-- FAIL\n", (long long)unwritten);
    ++failures;
  }
  std::vector<T> Ek(B * N * M, T(0));
  dtw_backward(a, grad.data(), Rk.data(), Ek.data(), nullptr);
  // value-only forward must agree too
  std::vector<T> values2(B);
  dtw_forward(a, values2.data(), nullptr, nullptr);
  double vtol = sizeof(T) == 8 ? 1e-10 : 1e-5;
  double worst_v = 0, worst_e = 0, emax = 0;
  for (int b = 0; b < B; ++b) {
    double err = std::fabs((double)values[b] - val[b]) / std::max(1.0, std::fabs(val[b]));
    double err2 = std::fabs((double)values2[b] - val[b]) / std::max(1.0, std::fabs(val[b]));
    worst_v = std::max({worst_v, err, err2});
  }
  for (size_t k = 0; k < E.size(); ++k) emax = std::max(emax, std::fabs(E[k]));
  for (size_t k = 0; k < E.size(); ++k) worst_e = std::max(worst_e, std::fabs((double)Ek[k] - E[k]) / std::max(emax, 1e-30));
  double etol = sizeof(T) == 8 ? 1e-9 : 1e-4;
  // The fused soft backward (squared Euclidean, D <= 4, series): grad_x and grad_y against
  // the contraction of the reference E, 2 sum_j E_ij (x_i - y_j) and its negative over i.
  double worst_g = 0;
  const bool fused = cs.soft && !cs.matrix && cs.metric == 0 && D <= 4;
  if (!dtw_fused_backward_supported(a) != !fused) {
    std::printf("dtw_fused_backward_supported disagrees  <-- FAIL\n");
    ++failures;
  }
  if (fused) {
    std::vector<T> gx(B * N * D, T(0)), gy(B * M * D, T(0));
    if (soft_dtw_backward_series(a, grad.data(), Rk.data(), gx.data(), gy.data(), nullptr) !=
        cudaSuccess) {
      std::printf("soft_dtw_backward_series refused a supported case  <-- FAIL\n");
      ++failures;
    }
    std::vector<double> gx_ref(B * N * D, 0.0), gy_ref(B * M * D, 0.0);
    for (int b = 0; b < B; ++b) for (int i = 0; i < N; ++i) for (int j = 0; j < M; ++j)
      for (int d = 0; d < D; ++d) {
        const double w = 2 * E[(b*N+i)*M+j] * ((double)x[(b*N+i)*D+d] - (double)y[(b*M+j)*D+d]);
        gx_ref[(b*N+i)*D+d] += w;
        gy_ref[(b*M+j)*D+d] -= w;
      }
    double gmax = 1e-30;
    for (double v : gx_ref) gmax = std::max(gmax, std::fabs(v));
    for (double v : gy_ref) gmax = std::max(gmax, std::fabs(v));
    for (size_t k = 0; k < gx.size(); ++k) worst_g = std::max(worst_g, std::fabs((double)gx[k] - gx_ref[k]) / gmax);
    for (size_t k = 0; k < gy.size(); ++k) worst_g = std::max(worst_g, std::fabs((double)gy[k] - gy_ref[k]) / gmax);
  } else if (soft_dtw_backward_series(a, grad.data(), Rk.data(), nullptr, nullptr, nullptr) !=
             cudaErrorInvalidValue) {
    std::printf("soft_dtw_backward_series accepted an unsupported case  <-- FAIL\n");
    ++failures;
  }
  // Hard DTW in fp32: rounding can break a near-tie between two paths the other way than the
  // fp64 reference does (exact ties for l1 in 1-D), so the kernel's E must be AN optimal
  // path: grad[b] on a monotone chain of allowed cells from (0, 0) to (n - 1, m - 1) and 0
  // elsewhere, whose cost (fp64, on the reference's costs) is the optimum up to rounding.
  bool ties = false;
  if (!cs.soft && sizeof(T) == 4 && !(worst_e <= etol)) {
    ties = true;
    for (int b = 0; b < B; ++b) {
      const int n = xl[b], m = yl[b];
      const T* Eb = &Ek[(size_t)b * N * M];
      int64_t marked = 0;
      for (int k = 0; k < N * M; ++k) marked += Eb[k] != T(0);
      int i = 0, j = 0;
      int64_t length = 1;
      double path_cost = c[(b*N)*M];
      bool chain = Eb[0] == grad[b];
      while (chain && (i < n - 1 || j < m - 1)) {  // the next cell of the chain: one of three
        const int steps[3][2] = {{1, 1}, {1, 0}, {0, 1}};
        bool moved = false;
        for (auto& st : steps) {
          const int ii = i + st[0], jj = j + st[1];
          if (ii < n && jj < m && Eb[ii * M + jj] == grad[b]) { i = ii; j = jj; moved = true; break; }
        }
        chain = moved;
        if (moved) { ++length; path_cost += c[(b*N+i)*M+j]; }
      }
      const double bound = 1e-5 * std::max(1.0, std::fabs(val[b]));
      if (!(chain && length == marked && std::fabs(path_cost - val[b]) <= bound)) ties = false;
    }
  }
  bool bad = !(worst_v <= vtol) || (!ties && !(worst_e <= etol)) || !(worst_g <= etol);
  if (bad) ++failures;
  std::printf("%s %s B=%d N=%d M=%d D=%d band=%lld gamma=%g metric=%d matrix=%d thr=%d: val %.2e E %.2e grad %.2e%s\n",
    sizeof(T)==8?"f64":"f32", cs.soft?"soft":"hard", B, N, M, D, (long long)cs.band, cs.gamma, cs.metric, cs.matrix, cs.threads + 1000 * cs.soft_rows, worst_v, worst_e, worst_g, bad ? "  <-- FAIL" : "");
}

// The NaN convention: a NaN in x of pair 1 (a random step within its length; on the first
// step in one of every three calls, where a min that drops NaN beside +inf loses it) makes
// that pair's value NaN in the kept and the value-only forward, and leaves pair 0's value
// as it is without the NaN; the backward (hard: the backtrack through a NaN R) runs and
// writes inside its pairs only (pair 0's E unchanged).
template <class T> void run_nan(const Case& cs) {
  const int B = 2, N = cs.N, M = cs.M, D = cs.D;
  std::normal_distribution<double> nd;
  std::vector<T> x(B * N * D), y(B * M * D);
  for (auto& v : x) v = (T)nd(rng);
  for (auto& v : y) v = (T)nd(rng);
  std::vector<int64_t> xl = {N, 1 + (int64_t)(rng() % N)}, yl = {M, 1 + (int64_t)(rng() % M)};
  std::vector<T> cost(B * N * M);
  for (int b = 0; b < B; ++b) for (int i = 0; i < N; ++i) for (int j = 0; j < M; ++j) {
    double t = 0;
    for (int d = 0; d < D; ++d) { double df = (double)x[(b*N+i)*D+d] - (double)y[(b*M+j)*D+d]; t += df * df; }
    cost[(b*N+i)*M+j] = (T)t;
  }
  auto forward = [&](std::vector<T>& values, std::vector<char>& R, std::vector<T>& E) {
    DtwArgs a{};
    a.cost = cs.matrix ? cost.data() : nullptr;
    a.x = x.data(); a.y = y.data(); a.x_batch_stride = N * D; a.y_batch_stride = M * D;
    a.dtype = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
    a.B = B; a.N = N; a.M = M; a.D = D; a.x_lengths = xl.data(); a.y_lengths = yl.data();
    a.metric = 0; a.band = cs.band; a.gamma = cs.gamma; a.soft = cs.soft; a.max_threads = cs.threads;
    std::vector<char> ws(dtw_workspace_bytes(a) + 8);
    a.workspace = ws.data(); a.workspace_bytes = ws.size();
    R.assign(B * dtw_kept_per_pair(a) * (cs.soft ? 8 : sizeof(T)), 0);
    dtw_forward(a, values.data(), R.data(), nullptr);
    std::vector<T> grad(B, T(1));
    E.assign(B * N * M, T(0));
    dtw_backward(a, grad.data(), R.data(), E.data(), nullptr);
    std::vector<T> value_only(B);
    dtw_forward(a, value_only.data(), nullptr, nullptr);
    return value_only;
  };
  std::vector<T> clean(B), values(B), E0, E1;
  std::vector<char> R;
  forward(clean, R, E0);
  const int row = rng() % 3 == 0 ? 0 : (int)(rng() % xl[1]);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  x[(1 * N + row) * D + (int)(rng() % D)] = nan;
  for (int j = 0; j < M; ++j) cost[(1 * N + row) * M + j] = nan;
  const std::vector<T> value_only = forward(values, R, E1);
  bool same_pair0 = true;
  for (int k = 0; k < N * M; ++k) same_pair0 = same_pair0 && E1[k] == E0[k];
  const bool bad = !std::isnan((double)values[1]) || !std::isnan((double)value_only[1]) ||
                   !(values[0] == clean[0]) || !(value_only[0] == clean[0]) || !same_pair0;
  if (bad) ++failures;
  std::printf("NaN %s %s N=%d M=%d D=%d band=%lld matrix=%d row=%d: values %g %g (value-only %g %g, clean %g)%s\n",
              sizeof(T) == 8 ? "f64" : "f32", cs.soft ? "soft" : "hard", N, M, D, (long long)cs.band,
              cs.matrix, row, (double)values[0], (double)values[1], (double)value_only[0],
              (double)value_only[1], (double)clean[0], bad ? "  <-- FAIL" : "");
}

// `dtw_test kept`: dtw_kept_per_pair over a grid, one line "N M soft D threads rows kept"
// each, which tests/test_cuda_kernels_emulated.py compares with the Python fake kernels'.
int print_kept_sizes() {
  for (int soft = 0; soft < 2; ++soft)
    for (int N : {1, 31, 128, 129, 500, 2048, 2049, 5000})
      for (int M : {1, 77, 4096})
        for (int D : {0, 1, 3, 6})  // 0: a precomputed cost
          for (int threads : {0, 32, 96})
            for (int rows : {0, 2, 4}) {
              DtwArgs a{};
              a.cost = D == 0 ? reinterpret_cast<const void*>(1) : nullptr;
              a.B = 1; a.N = N; a.M = M; a.D = D == 0 ? 1 : D; a.soft = soft; a.max_threads = threads;
              a.soft_rows = rows;
              std::printf("%d %d %d %d %d %d %lld\n", N, M, soft, D, threads, rows,
                          (long long)dtw_kept_per_pair(a));
            }
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "kept") return print_kept_sizes();
  const unsigned long long seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 12345;
  rng.seed(seed);
  std::printf("seed %llu\n", seed);
  std::vector<Case> cases;
  for (int soft = 0; soft < 2; ++soft)
    for (int64_t band : {-1LL, 0LL, 2LL})
      for (int matrix = 0; matrix < 2; ++matrix) {
        cases.push_back({3, 7, 5, 1, band, (bool)soft, 1.0, 0, (bool)matrix, 0});
        cases.push_back({3, 5, 9, 3, band, (bool)soft, 0.1, matrix ? 0 : 1, (bool)matrix, 0});
        cases.push_back({2, 300, 270, soft ? 6 : 1, band, (bool)soft, 1.0, matrix ? 0 : 2, (bool)matrix, 32});
        cases.push_back({2, 70, 90, 2, band, (bool)soft, 0.01, 0, (bool)matrix, 32});
        cases.push_back({2, 600, 150, 1, band, (bool)soft, 0.5, 0, (bool)matrix, 32});
        cases.push_back({3, 40, 33, 6, band, (bool)soft, 0.3, matrix ? 0 : 1, (bool)matrix, 0});
        cases.push_back({2, 300, 80, 3, band, (bool)soft, 0.2, 0, (bool)matrix, 32});
        cases.push_back({2, 290, 70, 7, band, (bool)soft, 0.2, 0, (bool)matrix, 32});
        cases.push_back({2, 260, 200, 4, band, (bool)soft, 0.7, 0, (bool)matrix, 32});
        // soft only: long fp32 hard paths have near-ties that fp32 rounding breaks either way
        if (soft) cases.push_back({2, 300, 270, 2, band, (bool)soft, 1.0, 0, (bool)matrix, 32});
      }
  // soft-DTW with 2 rows per thread (ETHER_KERNELS_DTW_SOFT_ROWS=2) on the multi-stripe cases
  const size_t base_cases = cases.size();
  for (size_t i = 0; i < base_cases; ++i) {
    if (cases[i].soft && cases[i].threads == 32) {
      Case c = cases[i];
      c.soft_rows = 2;
      cases.push_back(c);
    }
  }
  for (auto& c : cases) { run<double>(c); run<float>(c); }
  for (auto& c : cases) {
    if (c.soft_rows == 0 && c.N <= 300) { run_nan<double>(c); run_nan<float>(c); }
  }
  std::printf("%d failures\n", failures);
  return failures != 0;
}
