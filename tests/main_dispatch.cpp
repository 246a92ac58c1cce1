// Catch2 main of the dispatched test binary: names the instruction set the kernels run with,
// and exits 77 (ctest: skipped) when SAPO_ISA asks for one this CPU cannot run, so that a
// variant the host lacks is reported as skipped, never as passed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <sapo/dispatch.hpp>
#include <sapo/error.hpp>

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--bad-isa-env-check") == 0) {
    // The first kernel call resolves SAPO_ISA; a bad value must come back as a sapo::error.
    try {
      std::printf("active: %s\n", sapo::dispatch::isa_name(sapo::dispatch::active_isa()));
    } catch (const sapo::error& e) {
      std::printf("%s\n", e.what());
      return 0;
    }
    return 1;
  }
  const char* want = std::getenv("SAPO_ISA");
  if (want && *want) {
    const sapo::dispatch::isa i = sapo::dispatch::parse_isa(want, "SAPO_ISA");
    if (!sapo::dispatch::isa_supported(i)) {
      std::printf("SKIPPED: this CPU does not run the %s kernels (they are compiled, not run here)\n", want);
      return 77;
    }
  }
  std::printf("dispatched kernels run with: %s (best on this CPU: %s)\n",
              sapo::dispatch::isa_name(sapo::dispatch::active_isa()),
              sapo::dispatch::isa_name(sapo::dispatch::best_isa()));
  return Catch::Session().run(argc, argv);
}
