// Splitting a CPU kernel's work over a few threads without a thread pool or a second OpenMP runtime beside torch's:
// the calling thread and threads - 1 std::threads started for the call. Starting a thread costs tens of
// microseconds, so a kernel gives each thread at least `min_per_thread` units of work and small calls stay on the
// calling thread alone.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace blitzdiff {

// body(first, last) over contiguous ranges that cover [0, total) once, on up to `threads` threads (at least one;
// each range at least min_per_thread units unless there is only one). Returns when every range is done.
template <typename Body>
void parallel_ranges(std::int64_t total, std::int64_t min_per_thread, std::int64_t threads, const Body& body) {
  const std::int64_t used = std::max<std::int64_t>(1, std::min(threads, total / std::max<std::int64_t>(1, min_per_thread)));
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<std::size_t>(used - 1));
  for (std::int64_t t = 1; t < used; ++t) {
    helpers.emplace_back([&body, total, used, t] { body(total * t / used, total * (t + 1) / used); });
  }
  body(0, total / used);
  for (auto& helper : helpers) helper.join();
}

}  // namespace blitzdiff
