// Emulated test of the Ether loss and fused MSE CUDA kernels (compiled as C++, see
// cuda_runtime.h) against a double-precision reference, every dtype, odd shapes.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "cuda/kernels_cuda.h"
#include "common/ether_loss_math.h"
#include <random>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <algorithm>

using namespace ether_kernels;
using cuda::DType;

template <class T> struct Info;
template <> struct Info<float> { static constexpr DType d = DType::kFloat32; static constexpr double tol = 2e-5, gtol = 2e-5; static const char* name() { return "f32"; } using coef_t = float; };
template <> struct Info<double> { static constexpr DType d = DType::kFloat64; static constexpr double tol = 1e-11, gtol = 1e-12; static const char* name() { return "f64"; } using coef_t = double; };
template <> struct Info<__half> { static constexpr DType d = DType::kFloat16; static constexpr double tol = 2e-3, gtol = 2e-3; static const char* name() { return "f16"; } using coef_t = float; };
template <> struct Info<__nv_bfloat16> { static constexpr DType d = DType::kBFloat16; static constexpr double tol = 1.6e-2, gtol = 1.6e-2; static const char* name() { return "bf16"; } using coef_t = float; };

double to_d(float x) { return x; }
double to_d(double x) { return x; }
double to_d(__half x) { return __half2float(x); }
double to_d(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> T from_d(double x);
template <> float from_d<float>(double x) { return (float)x; }
template <> double from_d<double>(double x) { return x; }
template <> __half from_d<__half>(double x) { return __float2half_rn((float)x); }
template <> __nv_bfloat16 from_d<__nv_bfloat16>(double x) { return __float2bfloat16_rn((float)x); }

static int failures = 0, checks = 0;
bool close(double got, double want, double rtol, double atol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}
void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) { ++failures; if (failures < 40) std::printf("FAIL %s\n", what.c_str()); }
}

template <class T> double rt(double want) { return to_d(from_d<T>(want)); }
template <class T> constexpr double sub_atol() { return std::is_same_v<T, __half> ? 6e-8 : 0.0; }
template <class U> U* alloc(size_t n, unsigned char fill = 0xff) {  // 256-aligned, poisoned
  size_t bytes = ((n * sizeof(U) + 64) / 256 + 1) * 256;
  void* p = std::aligned_alloc(256, bytes);
  std::memset(p, fill, bytes);
  return static_cast<U*>(p);
}

struct Case { int64_t B, C, R; bool per_sample; int64_t disc, red; double alpha; bool misalign; bool bad_membership = false; };

template <class T>
void run_case(const Case& cs, std::mt19937_64& rng) {
  using coef_t = typename Info<T>::coef_t;
  const int64_t B = cs.B, C = cs.C, R = cs.R, N = B * C * R, L = C * R;
  char tag[200];
  std::snprintf(tag, sizeof tag, "%s B=%ld C=%ld R=%ld ps=%d disc=%ld red=%ld a=%g mis=%d", Info<T>::name(), B, C, R, cs.per_sample, cs.disc, cs.red, cs.alpha, cs.misalign);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int off = cs.misalign ? 1 : 0;
  T* pbase = alloc<T>(N + 8); T* tbase = alloc<T>(N + 8);
  T* pred = pbase + off; T* targ = tbase + off;
  std::vector<double> pd(N), td(N);
  for (int64_t b = 0; b < B; ++b) for (int64_t c = 0; c < C; ++c) for (int64_t r = 0; r < R; ++r) {
    int64_t e = b * L + c * R + r;
    pred[e] = from_d<T>(0.37 * c + 0.11 * (b % 3) + 0.5 * nd(rng)); targ[e] = from_d<T>(nd(rng));
    pd[e] = to_d(pred[e]); td[e] = to_d(targ[e]);
  }
  // membership: halves + an overlapping pair + singles, skip none
  std::vector<int64_t> mc, mg; int64_t M = 0;
  {
    int64_t h = std::max<int64_t>(1, C / 2);
    for (int64_t c = 0; c < h; ++c) { mc.push_back(c); mg.push_back(M); } ++M;
    if (C > h) { for (int64_t c = h; c < C; ++c) { mc.push_back(c); mg.push_back(M); } ++M; }
    mc.push_back(C - 1); mg.push_back(M); if (C > 2) { mc.push_back(0); mg.push_back(M); } ++M;
    if (C > 3) { mc.push_back(2); mg.push_back(M); ++M; }
  }
  if (cs.bad_membership) mc[0] = C;  // out of range
  const int64_t E = mc.size();
  std::vector<double> w(M); for (auto& x : w) x = 0.5 + std::fabs(nd(rng));
  int64_t* dmc = alloc<int64_t>(E); int64_t* dmg = alloc<int64_t>(E); double* dw = alloc<double>(M);
  std::copy(mc.begin(), mc.end(), dmc); std::copy(mg.begin(), mg.end(), dmg); std::copy(w.begin(), w.end(), dw);

  // reference
  const int64_t rows = cs.per_sample ? B : 1;
  std::vector<double> sums(rows * C, 0.0); double sse = 0;
  for (int64_t e = 0; e < N; ++e) {
    const int64_t b = e / L, c = (e / R) % C;
    sums[(cs.per_sample ? b * C : 0) + c] += pd[e];
    sse += (pd[e] - td[e]) * (pd[e] - td[e]);
  }
  std::vector<double> gs(M, 0.0); for (auto g : mg) gs[g] += 1;
  std::vector<double> scratch(M), coef_ref(rows * C);
  const double n = cs.per_sample ? R : double(B * R), scale = cs.per_sample ? cs.alpha / B : cs.alpha;
  double inter = 0;
  if (!cs.bad_membership)
    for (int64_t r = 0; r < rows; ++r)
      inter += math::finalize_row<double>(sums.data() + r * C, C, n, mc.data(), mg.data(), E, gs.data(), w.data(), M, cs.disc, scale, scratch.data(), coef_ref.data() + r * C);
  if (cs.per_sample) inter /= B;
  const double intra = cs.red == 0 ? sse / N : sse;
  double loss_ref = cs.alpha == 0 ? intra : intra + cs.alpha * inter;
  if (cs.bad_membership && cs.alpha != 0) loss_ref = NAN;

  // forward
  T* loss = alloc<T>(1); coef_t* coef = alloc<coef_t>(rows * C);
  cuda::EtherForwardArgs a{};
  a.y_pred = pred; a.y_true = targ; a.dtype = Info<T>::d; a.B = B; a.C = C; a.R = R; a.per_sample = cs.per_sample;
  a.member_channel = dmc; a.member_group = dmg; a.E = E; a.weights = dw; a.M = M; a.alpha = cs.alpha;
  a.discrepancy = cs.disc; a.reduction = cs.red; a.loss = loss; a.coef = coef;
  size_t bytes = cuda::ether_loss_forward_workspace_bytes(a);
  a.workspace = alloc<char>(bytes); a.workspace_bytes = bytes;
  expect(cuda::ether_loss_forward(a, nullptr) == cudaSuccess, std::string("launch ") + tag);
  expect(close(to_d(*loss), rt<T>(loss_ref), Info<T>::tol, 1e-7), std::string("loss ") + tag + " got " + std::to_string(to_d(*loss)) + " want " + std::to_string(loss_ref));
  int bad = 0;
  for (int64_t i = 0; i < rows * C; ++i) {
    double want = cs.bad_membership ? NAN : coef_ref[i];
    double ctol = std::is_same_v<T, double> ? 1e-9 : 2e-4;
    if (!close(coef[i], want, ctol, 1e-9 + 1e-5 * std::fabs(scale) / n)) { if (bad++ < 3) std::printf("  coef[%ld] got %.9g want %.9g\n", i, (double)coef[i], want); }
  }
  expect(bad == 0, std::string("coef ") + tag);
  std::free(a.workspace);

  // backward (both grads, then pred only) with the kernel's own coef
  if (!cs.bad_membership) {
    const double g = to_d(from_d<T>(0.7)), is = cs.red == 0 ? 2.0 / N : 2.0;
    T* gl = alloc<T>(1); *gl = from_d<T>(0.7);
    T* gpb = alloc<T>(N + 8); T* gtb = alloc<T>(N + 8);
    for (int pass = 0; pass < 2; ++pass) {
      cuda::EtherBackwardArgs ba{};
      ba.grad_loss = gl; ba.y_pred = pred; ba.y_true = targ; ba.dtype = Info<T>::d; ba.B = B; ba.C = C; ba.R = R;
      ba.per_sample = cs.per_sample; ba.coef = coef; ba.intra_scale = is;
      ba.grad_pred = gpb + off; ba.grad_true = pass == 0 ? (void*)(gtb + off) : nullptr;
      expect(cuda::ether_loss_backward(ba, nullptr) == cudaSuccess, std::string("bwd launch ") + tag);
      int badp = 0, badt = 0;
      for (int64_t e = 0; e < N; ++e) {
        const int64_t b = e / L, c = (e / R) % C;
        const double cf = coef[cs.per_sample ? b * C + c : c];
        const double d = pd[e] - td[e];
        const double wp = g * (is * d + cf), wt = -g * is * d;
        const double atol = 1e-6 * (std::fabs(g * is) * 4 + std::fabs(g * cf));
        if (!close(to_d(gpb[off + e]), rt<T>(wp), Info<T>::gtol, atol + sub_atol<T>())) { if (badp++ < 3) std::printf("  gp[%ld] got %.9g want %.9g\n", e, to_d(gpb[off + e]), wp); }
        if (pass == 0 && !close(to_d(gtb[off + e]), rt<T>(wt), Info<T>::gtol, atol + sub_atol<T>())) { if (badt++ < 3) std::printf("  gt[%ld] got %.9g want %.9g\n", e, to_d(gtb[off + e]), wt); }
      }
      expect(badp == 0 && badt == 0, std::string("bwd pass ") + std::to_string(pass) + " " + tag);
    }
    std::free(gl); std::free(gpb); std::free(gtb);
  }

  // MSE over the same data, all reductions
  for (int64_t red = 0; red < 3; ++red) {
    for (int cg = 0; cg < 2; ++cg) {
      if (red == 2 && cg) continue;
      T* l = alloc<T>(1); T* outb = alloc<T>(N + 8);
      cuda::MseForwardArgs m{};
      m.input = pred; m.target = targ; m.dtype = Info<T>::d; m.n = N; m.reduction = red; m.loss = l;
      m.out = red == 2 ? (void*)(outb + off) : nullptr; m.grad = (red != 2 && cg) ? (void*)(outb + off) : nullptr;
      m.grad_scale = 1.0;  // the op keeps p - t; mse_backward applies 2 (/ N)
      size_t mb = cuda::mse_forward_workspace_bytes(m); m.workspace = mb ? alloc<char>(mb) : nullptr; m.workspace_bytes = mb;
      expect(cuda::mse_forward(m, nullptr) == cudaSuccess, std::string("mse launch ") + tag);
      if (red != 2) expect(close(to_d(*l), rt<T>(red == 0 ? sse / N : sse), Info<T>::tol, 1e-7), std::string("mse loss ") + std::to_string(red) + tag);
      int badm = 0;
      if (red == 2 || cg) for (int64_t e = 0; e < N; ++e) {
        const double d = pd[e] - td[e];
        const double want = red == 2 ? d * d : m.grad_scale * d;
        if (!close(to_d(outb[off + e]), rt<T>(want), Info<T>::gtol, 1e-7 * m.grad_scale + sub_atol<T>())) ++badm;
      }
      expect(badm == 0, std::string("mse out ") + std::to_string(red) + " " + tag);
      if (red != 2 && cg) {  // backward from the kept p - t
        T* gl = alloc<T>(1); *gl = from_d<T>(0.7); const double g = to_d(*gl);
        T* gib = alloc<T>(N + 8);
        cuda::MseBackwardArgs b{}; b.grad_loss = gl; b.difference = outb + off; b.dtype = Info<T>::d; b.n = N;
        b.factor = red == 0 ? 2.0 / N : 2.0; b.out = gib + off;
        expect(cuda::mse_backward(b, nullptr) == cudaSuccess, "mse bwd launch");
        int badb = 0;
        for (int64_t e = 0; e < N; ++e) {
          const double want = to_d(outb[off + e]) * (g * b.factor);  // from the stored p - t
          if (!close(to_d(gib[off + e]), rt<T>(want), Info<T>::gtol, 1e-9 + sub_atol<T>())) ++badb;
        }
        expect(badb == 0, std::string("mse bwd ") + std::to_string(red) + " " + tag);
        std::free(gl); std::free(gib);
      }
      std::free(l); std::free(outb); if (m.workspace) std::free(m.workspace);
    }
  }
  std::free(pbase); std::free(tbase); std::free(loss); std::free(coef); std::free(dmc); std::free(dmg); std::free(dw);
}

int main(int argc, char** argv) {
  // Usage: ether_mse_test SEED [quick]
  const unsigned long long seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1234;
  std::mt19937_64 rng(seed);
  std::printf("seed %llu\n", seed);
  std::vector<Case> cases;
  const int64_t shapes[][3] = {{37, 5, 1}, {64, 8, 1}, {10, 5, 1}, {1, 1, 1}, {3000, 3, 7}, {257, 6, 3}, {5, 40, 2}, {4, 3, 1000},
                               {3, 2, 1024}, {2, 3, 1030}, {2, 2, 20000}, {9, 2, 64}, {6, 300, 4}, {2, 1100, 1}, {40, 2, 513}, {1, 3, 9000}, {50, 4, 60}, {33, 17, 5}, {7, 3, 300}, {70, 2, 2}};
  bool quick = argc > 2 && std::string(argv[2]) == "quick";
  int k = 0;
  for (auto& s : shapes) {
    for (int ps = 0; ps < 2; ++ps) {
      Case c{s[0], s[1], s[2], (bool)ps, (k % 2), (k / 2) % 2, (k % 5 == 0) ? 0.0 : 0.3, (k % 3 == 1)};
      ++k;
      cases.push_back(c);
    }
  }
  for (auto& c : cases) {
    run_case<float>(c, rng);
    if (!quick || c.B * c.C * c.R < 20000) { run_case<double>(c, rng); run_case<__half>(c, rng); run_case<__nv_bfloat16>(c, rng); }
  }
  // misaligned / aligned toggles for key shapes, bad membership
  run_case<float>({64, 8, 1, false, 0, 0, 0.5, true}, rng);
  run_case<float>({64, 8, 1, true, 1, 1, 0.5, false}, rng);
  run_case<__half>({16, 4, 2048, true, 0, 0, 0.5, false}, rng);
  run_case<__half>({16, 4, 2049, false, 1, 0, 0.5, true}, rng);
  run_case<float>({8, 4, 3, false, 0, 0, 0.5, false, true}, rng);
  run_case<float>({8, 4, 3, true, 0, 0, 0.0, false, true}, rng);
  for (int64_t red = 0; red < 3; ++red) {  // empty input
    float* l = alloc<float>(1);
    cuda::MseForwardArgs m{}; m.dtype = DType::kFloat32; m.n = 0; m.reduction = red; m.loss = l;
    m.workspace_bytes = cuda::mse_forward_workspace_bytes(m);
    expect(m.workspace_bytes == 0 && cuda::mse_forward(m, nullptr) == cudaSuccess, "mse empty launch");
    if (red == 0) expect(std::isnan(*l), "mse empty mean is NaN");
    if (red == 1) expect(*l == 0.0f, "mse empty sum is 0");
    std::free(l);
  }
  std::printf("%d/%d checks passed, %d launches, max grid %ld\n", checks - failures, checks, emu::g_launches, (long)emu::g_max_grid);
  return failures != 0;
}
