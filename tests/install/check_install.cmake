# Configures sapo alone, installs it into SCRATCH/prefix, then configures, builds and runs
# tests/install/consumer against that prefix. Any failing step fails the test.
file(REMOVE_RECURSE ${SCRATCH})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
endfunction()
run(${CMAKE_COMMAND} -S ${SAPO_SOURCE_DIR} -B ${SCRATCH}/sapo-build -G ${GENERATOR}
    -DCMAKE_CXX_COMPILER=${CXX} -DSAPO_BUILD_TESTS=OFF -DSAPO_BUILD_EXAMPLES=OFF
    -DSAPO_BUILD_BENCHMARKS=OFF -DSAPO_WITH_TORCH=OFF -DSAPO_WITH_CUDA=OFF
    -DCMAKE_INSTALL_PREFIX=${SCRATCH}/prefix)
run(${CMAKE_COMMAND} --install ${SCRATCH}/sapo-build)
run(${CMAKE_COMMAND} -S ${SAPO_SOURCE_DIR}/tests/install/consumer -B ${SCRATCH}/consumer-build -G ${GENERATOR}
    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${SCRATCH}/prefix)
run(${CMAKE_COMMAND} --build ${SCRATCH}/consumer-build)
run(${SCRATCH}/consumer-build/consumer)
message(STATUS "installed sapo found and used by an outside project")
