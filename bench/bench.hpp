// `dsv4-compressor bench`: the whole compressor step (projection to stored entry) timed per
// kind and batch shape, beside the library paths an engine would otherwise use, against the
// floor of the hardware measured in the same run.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dsv4/compressor.hpp"

namespace dsv4::bench {

// The paths compared. (a) is the path the project removes: a bf16 GEMM, a separate
// bf16->fp32 cast kernel, compress reading fp32. (b) compress reads the bf16 GEMM output.
// (c) the GEMM writes fp32. (d) the project's best path.
// (e) the fused decode step forced on (FusedDecode::always) where it applies (<= 256 tokens).
// (f) the library's unfused path with three kernels per compressor after the projection
// (FusedDecode::off, CompressLaunch::per_stage), for steps of at most 256 tokens, where (d)
// fuses or runs its compress step.
// (g) reach: not the compressor; a step of at most 256 tokens as one kernel that moves its
// bytes with the compressor's data flow and computes nothing (reach_probe.hpp), for d / g
// and g / floor.
enum class Variant { cast, bf16_direct, f32_gemm, best, fused, per_stage, reach };
constexpr int kVariants = 7;
const char* variant_key(Variant v);
const char* variant_label(Variant v);

// What one step runs: a single compressor, or a CSA layer's main and indexer together.
enum class Kind { csa_main, csa_indexer, csa_layer, hca };
const char* kind_label(Kind k);
std::vector<CompressorKind> members(Kind k);

struct Scenario {
  std::string name;   // e.g. "decode", "decode-partial", "decode-staggered", "mtp4", "prefill", "mixed"
  int batch = 0;      // requests in the step (prefill: 1)
  std::int64_t length = 0;  // prefill tokens
};

// The step's requests for a compressor of `ratio`: (start, tokens). Decode steps start where
// every request completes a window ("decode"), none does ("decode-partial"), or one in `ratio`
// does, positions spread over a window as in steady decoding ("decode-staggered").
std::vector<Request> step_requests(const Scenario& s, std::int64_t ratio);

struct Row {
  std::string model;
  Kind kind = Kind::csa_main;
  Scenario scenario;
  std::int64_t tokens = 0, entries = 0;
  double bytes = 0, flops = 0, floor_us = 0;
  std::array<double, kVariants> us{};  // median per step; NaN where not measured
};

struct Ceilings {
  double copy_gbps = 0;      // device-to-device copy, bytes read + written per second / 1e9
  double matmul_tflops = 0;  // large bf16 GEMM
  // GPU: the reach probe moving no bytes (its launch, wait, exchange and completion): the
  // least any step with the compressor's data flow takes as one kernel in a stream.
  double empty_step_us = NAN;
};

// Where and when a benchmark ran: the header of every report and JSON file.
struct RunInfo {
  std::string device, commit, date, command;
};

struct Report : RunInfo {
  bool gpu = false;
  Ceilings ceilings;
  std::vector<Row> rows;
};

// Minimal bytes and flops of one step: weights, x, state (ratio 4: the rows read and kept;
// ratio 128: running accumulators, 3 * head_dim floats read and written per request) and the
// stored entries.
void count_work(const Row& row, const CompressorSpec& spec, DType state_dtype, double* bytes, double* flops,
                std::int64_t* tokens, std::int64_t* entries);

constexpr int kMostDecodeBatch = 256;  // the decode range: up to 256 requests a step

struct Options {
  bool quick = false;
  std::string json, svg, device = "auto";
  std::string filter;   // only rows whose "model kind step" label contains this text
  std::vector<int> batches;  // decode batch sizes to time (1..kMostDecodeBatch); empty: the default set
  std::string command;  // as typed, for the record
};

// Runs the benchmark; returns the report after printing the table.
Report run(const Options& options);
Report run_gpu(const Options& options, const std::vector<std::string>& models,
               const std::vector<Scenario>& scenarios);
Report run_cpu(const Options& options, const std::vector<Scenario>& scenarios);

void print_table(const Report& r);
void print_model_level(const Report& r);
void write_json(const Report& r, const std::string& path);
void write_svg(const Report& r, const std::string& path);
void progress(int done, int total, const std::string& what);
std::string now_utc();
std::string commit_id();  // $DSV4_COMMIT, else the commit the build was configured at
// The label --filter matches against, e.g. "flash CSA main decode B=64".
std::string row_label(const std::string& model, Kind kind, const Scenario& s);
// Whether --filter selects a label: an empty filter selects every label, else the label
// contains one of the filter's alternatives, separated by '|' ("HCA decode|CSA layer decode":
// the rows the decode targets judge, in one run and so against one floor).
bool label_selected(const std::string& filter, const std::string& label);

// `dsv4-compressor bench-projection`: the cuBLASLt algorithms the projection could use, each
// timed at every token count from decode to prefill (CUDA graph replays, weights rotated
// through 3x L2), with the rules that pick one algorithm for all counts (heuristic at a
// reference token count, workspace allowed or not, split-K allowed or not) and whether a
// token's row has the same bits at every count (SPEC section 3 needs that of the rule taken).
struct SweepOptions {
  bool quick = false;   // Flash shapes, bf16 output only
  bool library_only = false;  // time only the library's projection, no other candidate
  std::string json;
  std::string filter;   // only shapes whose "model kind dtype" label contains this
  std::string command;
};
struct SweepCandidate {
  std::string config;                  // tile, split-K, reduction scheme, stages, ...
  std::vector<double> us;              // per token count; NaN where the algorithm cannot run
  std::vector<double> workspace_mib;   // needed per token count
  bool row_invariant = true;           // the first rows' bits the same at every count
  int same_bits_as = -1;               // the first candidate whose rows have the same bits
  std::vector<unsigned char> first_rows;  // the rows compared (not written to JSON)
};
struct SweepRule {
  std::string label;
  int candidate = -1;  // index into candidates; -1 where the rule finds nothing
};
struct SweepShape {
  std::string label;  // "flash CSA layer bf16"
  std::int64_t width = 0, hidden = 0;
  std::vector<SweepCandidate> candidates;
  std::vector<SweepRule> rules;
};
struct SweepReport : RunInfo {
  std::vector<std::int64_t> tokens;
  std::vector<SweepShape> shapes;
};
SweepReport run_projection_sweep(const SweepOptions& options);
void write_sweep_json(const SweepReport& r, const std::string& path);

// `dsv4-compressor bench-multiply`: one fused-step projection item's multiply alone (64 weight
// rows x 512 of hidden x 8, 32 or 64 tokens, operands in shared memory), timed in SM cycles
// for the instruction sequences an item could use (multiply_probe.cu), each checked against
// fp64 and for a token's bits not depending on the tokens beside it.
struct MultiplyOptions {
  std::string json;
  std::string command;
};
struct MultiplyRow {
  std::string sequence;
  int tokens = 0;
  int blocks_per_sm = 0;        // the grid: this many blocks per SM (at 64 tokens an SM holds
                                // one block's shared memory, so 2 means two waves of one)
  double cycles_median = NAN;  // NaN where the build has no code for it on this device
  double cycles_max = NAN;
  double worst_error = NAN;    // |result - fp64| / sum |products|, block 0
  bool same_bits_as_8_tokens = false;  // tokens 0-7 have the bits they have in an 8-token item
  int same_bits_as_wgmma = -1;         // mma.sync rows: 1 / 0 where the wgmma row of the same
                                       // tokens and grid ran, else -1 (JSON: true / false / null)
};
struct MultiplyReport : RunInfo {
  double sm_clock_mhz = 0;
  std::vector<MultiplyRow> rows;
};
MultiplyReport run_multiply_probe(const MultiplyOptions& options);
void write_multiply_json(const MultiplyReport& r, const std::string& path);

}  // namespace dsv4::bench
