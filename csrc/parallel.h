// Splitting a CPU kernel's work over a few threads without a second OpenMP runtime beside torch's. Built with
// OpenMP (GCC's libgomp, soname libgomp.so.1), the module shares the one runtime of the process: torch's wheels
// ship their own libgomp.so.1 and load it first, and the loader satisfies this module's libgomp.so.1 with it. Its
// workers, idle or still spinning after torch's last parallel region, take the ranges at once; std::threads
// started per call would compete with those spinning workers for the cores (on 2 cores, an adaLN call right after
// a matmul ran 2.2x slower on 2 std::threads than on 1). Without OpenMP: the calling thread and threads - 1
// std::threads. Either way a kernel gives each thread at least `min_per_thread` units of work (a thread start or
// wake-up costs microseconds to tens of them), so small calls stay on the calling thread alone, and the partition
// into ranges depends only on `total` and the thread count asked for.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace blitzdiff {

// std::invalid_argument ("<op>: threads must be >= 1, got N") unless threads >= 1: the entry points' thread count.
inline void check_threads(const char* op, std::int64_t threads) {
  if (threads < 1) {
    throw std::invalid_argument(std::string(op) + ": threads must be >= 1, got " + std::to_string(threads));
  }
}

// body(first, last) over contiguous ranges that cover [0, total) once, on up to `threads` threads (at least one;
// each range at least min_per_thread units unless there is only one). Returns when every range is done.
template <typename Body>
void parallel_ranges(std::int64_t total, std::int64_t min_per_thread, std::int64_t threads, const Body& body) {
  const std::int64_t used = std::max<std::int64_t>(1, std::min(threads, total / std::max<std::int64_t>(1, min_per_thread)));
  if (used == 1) {
    body(0, total);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(used))
  {  // the runtime may grant fewer threads than asked: each takes every n-th range, so all `used` ranges run
    const std::int64_t n = omp_get_num_threads();
    for (std::int64_t t = omp_get_thread_num(); t < used; t += n) body(total * t / used, total * (t + 1) / used);
  }
#else
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<std::size_t>(used - 1));
  for (std::int64_t t = 1; t < used; ++t) {
    helpers.emplace_back([&body, total, used, t] { body(total * t / used, total * (t + 1) / used); });
  }
  body(0, total / used);
  for (auto& helper : helpers) helper.join();
#endif
}

}  // namespace blitzdiff
