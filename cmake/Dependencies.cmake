# xvalid's dependencies: Python (for the module), nlohmann-json (found offline first),
# OpenMP and pybind11. Included from the top-level CMakeLists.txt.

# Python: scikit-build-core passes its interpreter. A plain cmake build uses the repo's
# .venv when there is one: it has pybind11 and the nlohmann-json headers.
if(NOT DEFINED Python_EXECUTABLE AND NOT DEFINED ENV{VIRTUAL_ENV}
   AND EXISTS "${PROJECT_SOURCE_DIR}/.venv/bin/python")
  set(Python_EXECUTABLE "${PROJECT_SOURCE_DIR}/.venv/bin/python")
endif()
if(SKBUILD)
  find_package(Python REQUIRED COMPONENTS Interpreter Development.Module)
else()
  find_package(Python COMPONENTS Interpreter Development.Module)
endif()

# nlohmann-json, offline first:
#  (a) the headers of PyPI's nlohmann-json (no CMake config; in the build env because
#      pyproject's build-system.requires lists it). find_spec does not import the
#      package, whose __init__ needs importlib_resources;
#  (b) an installed CMake config, e.g. Debian's nlohmann-json3-dev;
#  (c) the release tarball.
if(Python_Interpreter_FOUND)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import importlib.util, os; s = importlib.util.find_spec('nlohmann_json'); print(os.path.join(list(s.submodule_search_locations)[0], 'include'))"
    OUTPUT_VARIABLE XVALID_PYPI_JSON_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE pypi_json_result ERROR_QUIET)
endif()
if(Python_Interpreter_FOUND AND pypi_json_result EQUAL 0 AND EXISTS "${XVALID_PYPI_JSON_INCLUDE}/nlohmann/json.hpp")
  message(STATUS "nlohmann-json: PyPI package headers in ${XVALID_PYPI_JSON_INCLUDE}")
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  target_include_directories(nlohmann_json::nlohmann_json INTERFACE "${XVALID_PYPI_JSON_INCLUDE}")
else()
  # Equivalent to FetchContent_Declare(... FIND_PACKAGE_ARGS 3.11 CONFIG), which needs
  # CMake 3.24: an installed config first, then the download.
  find_package(nlohmann_json 3.11 CONFIG QUIET)
  if(nlohmann_json_FOUND)
    message(STATUS "nlohmann-json: installed CMake config ${nlohmann_json_DIR}")
  else()
    message(STATUS "nlohmann-json: no headers found (pip install nlohmann-json, or apt-get install "
                   "nlohmann-json3-dev, to build offline); downloading v3.12.0")
    include(FetchContent)
    FetchContent_Declare(nlohmann_json
      URL https://github.com/nlohmann/json/releases/download/v3.12.0/json.tar.xz
      URL_HASH SHA256=42f6e95cad6ec532fd372391373363b62a14af6d771056dbfc86160e6dfff7aa)
    FetchContent_MakeAvailable(nlohmann_json)
  endif()
endif()

find_package(OpenMP COMPONENTS CXX)
if(NOT OpenMP_CXX_FOUND)
  message(STATUS "OpenMP not found: the kernel runs single-threaded")
endif()

# pybind11: required for a wheel; a plain cmake build without it builds the runner only.
if(Python_Interpreter_FOUND AND NOT DEFINED pybind11_DIR)
  execute_process(COMMAND "${Python_EXECUTABLE}" -c "import pybind11; print(pybind11.get_cmake_dir())"
                  OUTPUT_VARIABLE pybind11_cmake_dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(pybind11_cmake_dir)
    set(pybind11_DIR "${pybind11_cmake_dir}" CACHE PATH "pybind11's CMake config")
  endif()
endif()
if(SKBUILD)
  find_package(pybind11 CONFIG REQUIRED)
elseif(Python_FOUND)
  find_package(pybind11 CONFIG QUIET)
endif()
