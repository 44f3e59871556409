#include "support/reference.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "core/numerics.hpp"
#include "core/rope.hpp"

namespace dsv4::test {

double round_bf16(double v) {
  if (v == 0.0 || !std::isfinite(v)) return v;
  int e = 0;
  const double m = std::frexp(v, &e);                // |m| in [0.5, 1)
  return std::ldexp(std::nearbyint(m * 256.0), e - 8);  // 8 significant bits, ties to even
}

std::vector<double> reference_entries(const CompressorSpec& spec, const RandomWeights& w,
                                      const std::uint16_t* x, std::int64_t length) {
  const std::int64_t r = spec.ratio, hd = spec.head_dim, half = spec.coff() * hd;
  const std::int64_t H = spec.hidden;
  const std::int64_t windows = length / r;
  // Only the tokens of complete windows matter.
  const std::int64_t used = windows * r;
  std::vector<double> kv(static_cast<std::size_t>(used * half)), score(kv.size());
  std::vector<double> xd(static_cast<std::size_t>(used * H));
  for (std::size_t i = 0; i < xd.size(); ++i) xd[i] = num::f32_from_bf16(x[i]);
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < half; ++c) {
    std::vector<double> wk(static_cast<std::size_t>(H)), wg(static_cast<std::size_t>(H));
    for (std::int64_t k = 0; k < H; ++k) {
      wk[k] = num::f32_from_bf16(w.wkv[c * H + k]);
      wg[k] = num::f32_from_bf16(w.wgate[c * H + k]);
    }
    for (std::int64_t t = 0; t < used; ++t) {
      double a = 0, b = 0;
      const double* xt = xd.data() + t * H;
      for (std::int64_t k = 0; k < H; ++k) {
        a += xt[k] * wk[k];
        b += xt[k] * wg[k];
      }
      kv[t * half + c] = a;
      score[t * half + c] = b;
    }
  }
  // The table is part of the definition: SPEC builds inv_freq in fp32.
  const std::vector<float> inv_freq = yarn_inv_freq(spec.rope);

  std::vector<double> out(static_cast<std::size_t>(windows * hd));
  for (std::int64_t win = 0; win < windows; ++win) {
    std::vector<double> v(static_cast<std::size_t>(hd));
    for (std::int64_t d = 0; d < hd; ++d) {
      std::vector<double> logits, values;
      if (spec.overlap()) {
        if (win > 0)
          for (std::int64_t j = 0; j < r; ++j) {
            const std::int64_t t = (win - 1) * r + j;
            logits.push_back(score[t * half + d] + w.ape[j * half + d]);
            values.push_back(kv[t * half + d]);
          }
        for (std::int64_t j = 0; j < r; ++j) {
          const std::int64_t t = win * r + j;
          logits.push_back(score[t * half + hd + d] + w.ape[j * half + hd + d]);
          values.push_back(kv[t * half + hd + d]);
        }
      } else {
        for (std::int64_t j = 0; j < r; ++j) {
          const std::int64_t t = win * r + j;
          logits.push_back(score[t * half + d] + w.ape[j * half + d]);
          values.push_back(kv[t * half + d]);
        }
      }
      double mx = -std::numeric_limits<double>::infinity();
      for (double l : logits) mx = std::max(mx, l);
      double sum = 0, acc = 0;
      for (std::size_t j = 0; j < logits.size(); ++j) {
        const double p = std::exp(logits[j] - mx);
        sum += p;
        acc += p * values[j];
      }
      v[d] = round_bf16(acc / sum);
    }
    double ms = 0;
    for (double e : v) ms += e * e;
    const double inv_rms = 1.0 / std::sqrt(ms / static_cast<double>(hd) + spec.rms_eps);
    for (std::int64_t d = 0; d < hd; ++d) v[d] = round_bf16(v[d] * inv_rms * w.norm[d]);
    const std::int64_t pos = win * r;
    for (std::int64_t i = 0; i < spec.rope.dim / 2; ++i) {
      const double angle = static_cast<double>(pos) * static_cast<double>(inv_freq[i]);
      const double c = std::cos(angle), s = std::sin(angle);
      double& a = v[spec.nope_dim() + 2 * i];
      double& b = v[spec.nope_dim() + 2 * i + 1];
      const double na = a * c - b * s, nb = a * s + b * c;
      a = round_bf16(na);
      b = round_bf16(nb);
    }
    if (spec.rotate) {
      // Sylvester-ordered Walsh-Hadamard matrix: H[i][j] = (-1)^popcount(i & j).
      std::vector<double> rot(static_cast<std::size_t>(hd));
      for (std::int64_t i = 0; i < hd; ++i) {
        double s = 0;
        for (std::int64_t j = 0; j < hd; ++j) s += (__builtin_popcountll(static_cast<unsigned long long>(i & j)) & 1) ? -v[j] : v[j];
        rot[i] = round_bf16(s / std::sqrt(static_cast<double>(hd)));
      }
      v = rot;
    }
    std::copy(v.begin(), v.end(), out.begin() + win * hd);
  }
  return out;
}

double relative_l2(const std::vector<std::uint16_t>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double num2 = 0, den2 = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double v = num::f32_from_bf16(a[i]);
    if (!std::isfinite(v)) return std::numeric_limits<double>::infinity();
    num2 += (v - b[i]) * (v - b[i]);
    den2 += b[i] * b[i];
  }
  return den2 > 0 ? std::sqrt(num2 / den2) : std::sqrt(num2);
}

double tolerance(Precision p) { return entry_tolerance(p); }

namespace {

// All non-negative finite e4m3fn values by code 0..126.
std::vector<double> e4m3_values() {
  std::vector<double> v;
  for (int code = 0; code < 127; ++code) {
    const int e = code >> 3, m = code & 7;
    v.push_back(e == 0 ? m * std::ldexp(1.0, -9) : (1 + m / 8.0) * std::ldexp(1.0, e - 7));
  }
  return v;
}

}  // namespace

std::uint8_t quantize_e4m3(double x) {
  static const std::vector<double> values = e4m3_values();
  const double a = std::fabs(x);
  int best = 0;
  for (int c = 1; c < 127; ++c) {
    const double dc = std::fabs(values[c] - a), db = std::fabs(values[best] - a);
    if (dc < db || (dc == db && (c % 2 == 0))) best = c;
  }
  return static_cast<std::uint8_t>((x < 0 ? 0x80 : 0) | best);
}

std::string check_stored_entries(const CompressorSpec& spec, const std::vector<std::uint16_t>& entries,
                                 const std::vector<std::uint8_t>& cache, std::int64_t count) {
  const std::int64_t hd = spec.head_dim, bytes = spec.entry_bytes();
  std::ostringstream err;
  for (std::int64_t e = 0; e < count; ++e) {
    const std::uint16_t* entry = entries.data() + e * hd;
    const std::uint8_t* row = cache.data() + e * bytes;
    if (spec.entry_format == EntryFormat::bf16) {
      if (std::memcmp(row, entry, static_cast<std::size_t>(2 * hd)) != 0) err << "entry " << e << ": bf16 bytes differ\n";
      continue;
    }
    const std::int64_t nope = spec.nope_dim(), blocks = nope / 64;
    if (bytes != ((nope + 2 * spec.rope.dim + blocks + 7) / 8) * 8) err << "entry size " << bytes << " unexpected\n";
    for (std::int64_t b = 0; b < blocks; ++b) {
      double amax = 0;
      for (int i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(double(num::f32_from_bf16(entry[b * 64 + i]))));
      amax = std::max(amax, 1e-8);
      const int exponent = static_cast<int>(std::ceil(std::log2(amax / 448.0)));
      const std::uint8_t stored_scale = row[nope + 2 * spec.rope.dim + b];
      if (stored_scale != exponent + 127) {
        err << "entry " << e << " block " << b << ": scale byte " << int(stored_scale) << ", expected " << exponent + 127 << "\n";
        continue;
      }
      for (int i = 0; i < 64; ++i) {
        const double x = num::f32_from_bf16(entry[b * 64 + i]);
        const std::uint8_t want = quantize_e4m3(std::ldexp(x, -exponent));
        const std::uint8_t got = row[b * 64 + i];
        // +0 and -0 codes decode to the same value; compare decoded values.
        const double dw = num::f32_from_e4m3(want), dg = num::f32_from_e4m3(got);
        if (dw != dg) {
          err << "entry " << e << " dim " << b * 64 + i << ": fp8 code " << int(got) << ", expected " << int(want) << "\n";
          break;
        }
      }
    }
    if (std::memcmp(row + nope, entry + nope, static_cast<std::size_t>(2 * spec.rope.dim)) != 0)
      err << "entry " << e << ": bf16 rope dims differ\n";
    for (std::int64_t p = nope + 2 * spec.rope.dim + blocks; p < bytes; ++p)
      if (row[p] != 0) err << "entry " << e << ": pad byte " << p << " is not zero\n";
    if (err.tellp() > 2000) break;
  }
  return err.str();
}

}  // namespace dsv4::test
