# Finds the Python that builds and tests the sapo_torch package, and whether it has torch.
# Included by the top-level CMakeLists.txt before option(SAPO_WITH_PYTHON ...), so that the
# option can default to ON only where the package can actually be built.
#
# Sets (cache):   SAPO_PYTHON_EXECUTABLE   the interpreter (default /usr/bin/python3: Debian's,
#                                          whose python3-torch uses the same libtorch as
#                                          libtorch-dev; another python3 on PATH may lack torch)
# Sets (normal):  SAPO_PYTHON_HAS_TORCH    TRUE when it imports torch and setuptools
#                 SAPO_PYTHON_HAS_PYTEST   TRUE when it imports pytest
#                 SAPO_PYTHON_TORCH_VERSION

if(NOT DEFINED SAPO_PYTHON_EXECUTABLE)
  if(EXISTS /usr/bin/python3)
    set(_sapo_py /usr/bin/python3)
  else()
    find_program(_sapo_py NAMES python3 python)
  endif()
  set(SAPO_PYTHON_EXECUTABLE "${_sapo_py}" CACHE FILEPATH
      "Python interpreter (with torch) that builds and tests the sapo_torch package")
  unset(_sapo_py)
  unset(_sapo_py CACHE)
endif()

set(SAPO_PYTHON_HAS_TORCH FALSE)
set(SAPO_PYTHON_HAS_PYTEST FALSE)
set(SAPO_PYTHON_TORCH_VERSION "")
if(SAPO_PYTHON_EXECUTABLE)
  execute_process(
    COMMAND "${SAPO_PYTHON_EXECUTABLE}" -c "import setuptools, torch; print(torch.__version__)"
    RESULT_VARIABLE _sapo_rc OUTPUT_VARIABLE _sapo_out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_sapo_rc EQUAL 0)
    set(SAPO_PYTHON_HAS_TORCH TRUE)
    set(SAPO_PYTHON_TORCH_VERSION "${_sapo_out}")
  endif()
  execute_process(
    COMMAND "${SAPO_PYTHON_EXECUTABLE}" -c "import pytest"
    RESULT_VARIABLE _sapo_rc OUTPUT_QUIET ERROR_QUIET)
  if(_sapo_rc EQUAL 0)
    set(SAPO_PYTHON_HAS_PYTEST TRUE)
  endif()
  unset(_sapo_rc)
  unset(_sapo_out)
endif()
