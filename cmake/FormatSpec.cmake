# The model file's format (python/xvalid/schemas/model-format.json, the one description both
# loaders read) as a C++ header: ${XVALID_GENERATED_DIR}/io/format_spec.h, from the template
# csrc/io/format_spec.h.in. Regenerated whenever the JSON changes (CMAKE_CONFIGURE_DEPENDS).
# Also runs as a script for builds without CMake (scripts/fuzz_loader.sh):
#   cmake -DXVALID_SOURCE_DIR=<repo> -DXVALID_GENERATED_DIR=<dir> -P cmake/FormatSpec.cmake
if(CMAKE_SCRIPT_MODE_FILE)
  set(PROJECT_SOURCE_DIR "${XVALID_SOURCE_DIR}")
else()
  set(XVALID_GENERATED_DIR "${PROJECT_BINARY_DIR}/generated")
endif()
set(XVALID_FORMAT_JSON "${PROJECT_SOURCE_DIR}/python/xvalid/schemas/model-format.json")
if(NOT CMAKE_SCRIPT_MODE_FILE)
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${XVALID_FORMAT_JSON}")
endif()
file(READ "${XVALID_FORMAT_JSON}" spec)

string(JSON XVALID_FORMAT_NAME GET "${spec}" format)
string(JSON XVALID_FORMAT_VERSION GET "${spec}" format_version)
string(JSON XVALID_MAX_DIM GET "${spec}" max_dim)
string(JSON XVALID_MAX_JSON_DEPTH GET "${spec}" max_json_depth)
string(JSON XVALID_MAX_ST_HEADER GET "${spec}" max_safetensors_header_bytes)

# {"name", itemsize, "safetensors"} per storage dtype
set(XVALID_STORAGE_DTYPES "")
string(JSON n LENGTH "${spec}" storage_dtypes)
math(EXPR last "${n} - 1")
foreach(i RANGE ${last})
  string(JSON name MEMBER "${spec}" storage_dtypes ${i})
  string(JSON size GET "${spec}" storage_dtypes ${name} itemsize)
  string(JSON st GET "${spec}" storage_dtypes ${name} safetensors)
  string(APPEND XVALID_STORAGE_DTYPES "    {\"${name}\", ${size}, \"${st}\"},\n")
endforeach()

# a list of strings as C string literals
function(xvalid_string_list key out)
  set(text "")
  string(JSON n LENGTH "${spec}" ${key})
  math(EXPR last "${n} - 1")
  foreach(i RANGE ${last})
    string(JSON item GET "${spec}" ${key} ${i})
    string(APPEND text "\"${item}\", ")
  endforeach()
  set(${out} "${text}" PARENT_SCOPE)
endfunction()
xvalid_string_list(reserved_dtypes XVALID_RESERVED_DTYPES)
xvalid_string_list(required_sections XVALID_REQUIRED_SECTIONS)
xvalid_string_list(required_config XVALID_REQUIRED_CONFIG)

# {"name", default, low, high, low_included, high_included, "text"} per float hyperparameter
set(XVALID_FLOAT_CONFIG "")
string(JSON n LENGTH "${spec}" float_config)
math(EXPR last "${n} - 1")
foreach(i RANGE ${last})
  string(JSON name MEMBER "${spec}" float_config ${i})
  set(fields "")
  foreach(f default low high low_included high_included)
    string(JSON v GET "${spec}" float_config ${name} ${f})
    if(v STREQUAL "ON")  # string(JSON GET) returns JSON booleans as ON/OFF
      set(v true)
    elseif(v STREQUAL "OFF")
      set(v false)
    endif()
    string(APPEND fields "${v}, ")
  endforeach()
  string(JSON text GET "${spec}" float_config ${name} text)
  string(APPEND XVALID_FLOAT_CONFIG "    {\"${name}\", ${fields}\"${text}\"},\n")
endforeach()

configure_file("${PROJECT_SOURCE_DIR}/csrc/io/format_spec.h.in" "${XVALID_GENERATED_DIR}/io/format_spec.h" @ONLY)
