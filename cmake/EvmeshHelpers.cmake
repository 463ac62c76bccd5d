# Project-wide build settings, applied per target (no global flags).

# Warnings: an INTERFACE target that every evmesh target links PRIVATE.
add_library(evmesh_warnings INTERFACE)
target_compile_options(evmesh_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion
  $<$<BOOL:${EVMESH_WERROR}>:-Werror>)

# Options every evmesh target shares: CAF type-ID checks and sanitizers.
add_library(evmesh_build_options INTERFACE)
target_compile_definitions(evmesh_build_options INTERFACE CAF_ENABLE_TYPE_ID_CHECKS)
if(EVMESH_SANITIZE)
  target_compile_options(evmesh_build_options INTERFACE
    -fsanitize=address,undefined -fsanitize-recover=all -fno-omit-frame-pointer)
  target_link_options(evmesh_build_options INTERFACE
    -fsanitize=address,undefined -fsanitize-recover=all)
endif()

# evmesh_target_defaults(<target>): warnings + shared options.
function(evmesh_target_defaults target)
  target_link_libraries(${target} PRIVATE evmesh_warnings)
  target_link_libraries(${target} PUBLIC evmesh_build_options)
endfunction()

# Handlers registered with EVMESH_EVENT_PATTERN live in static objects that
# nothing references; inside a static library the linker would drop them. Use
# evmesh_add_handlers(<target> SOURCES ...) to compile handler sources as an
# OBJECT library linked into <target>, so every registration survives.
function(evmesh_add_handlers target)
  cmake_parse_arguments(ARG "" "" "SOURCES" ${ARGN})
  add_library(${target}_handlers OBJECT ${ARG_SOURCES})
  evmesh_target_defaults(${target}_handlers)
  target_link_libraries(${target}_handlers PUBLIC evmesh::evmesh)
  target_link_libraries(${target} PRIVATE ${target}_handlers)
endfunction()

# evmesh_add_gtest(<name> SOURCES ... LIBS ... [TIMEOUT s] [LABELS ...])
# One GoogleTest executable registered with ctest; every test gets a TIMEOUT.
set(EVMESH_SANITIZER_ENV
  "ASAN_OPTIONS=detect_leaks=0:halt_on_error=1"
  "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=${PROJECT_SOURCE_DIR}/cmake/ubsan.supp")
function(evmesh_add_gtest name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  add_executable(${name} ${ARG_SOURCES})
  evmesh_target_defaults(${name})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main)
  add_test(NAME ${name} COMMAND ${name} --gtest_brief=1)
  set_tests_properties(${name} PROPERTIES TIMEOUT ${ARG_TIMEOUT}
    ENVIRONMENT "${EVMESH_SANITIZER_ENV}" LABELS "${ARG_LABELS}")
endfunction()
