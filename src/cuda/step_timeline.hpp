// Diagnostics (CMake option DSV4_FUSED_TIMELINE), host side: the phase stamps of the unfused
// decode kernels that have no fused step's stamps (the sliced projection and the running
// step). Each such kernel keeps one array of stamps in device memory, overwritten by every
// launch, so it holds the kernel's last launch; at exit the process writes every registered
// array to the CSV file named by $DSV4_STEP_TIMELINE_CSV, which scripts/step-timeline.py
// summarizes. With programmatic dependent launch the kernels of a step overlap, which a
// profiler that serializes kernels cannot show.
#pragma once

namespace dsv4::cuda {

constexpr int kStepTimelineBlocks = 1024;  // blocks of a launch that are recorded
constexpr int kStepTimelineAtoms = 16;     // k atoms of a sliced projection block (Pro: 14)

// One block's stamps: the global timer (ns) as thread 0 passed each phase; zero where the
// block never passed it. mark1 and mark2 are the kernel's own (step_timeline.cuh says where).
// atom[a]: the sliced projection's multiply loop as atom a's x was in shared memory for every
// thread (after its barrier), so the gaps between them are what each atom cost; the running
// step leaves them zero. A launch with fewer atoms leaves an earlier launch's stamps past its
// own, older than its start.
struct StepStamps {
  unsigned long long start, waited, mark1, mark2, exit;
  unsigned sm, blocks;
  unsigned long long atom[kStepTimelineAtoms];
};

// Writes `stamps` (kStepTimelineBlocks StepStamps in device memory) at exit, named `kernel`.
void register_step_timeline(const char* kernel, const void* stamps);

}  // namespace dsv4::cuda
