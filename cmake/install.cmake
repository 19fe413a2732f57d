# `cmake --install`: the kvplan binary; libkvplan.so with capi/kvplan.h and a pkg-config file (kvplan.pc); the C++
# runtime as static libraries with their headers; and the CMake package find_package(kvplan) reads:
#   kvplan::capi     libkvplan.so (component capi; needs nothing else, so C projects can use it)
#   kvplan::runtime  the C++ runtime (component runtime; finds abseil, protobuf, OpenMP, OpenBLAS, PCRE2 and,
#                    in a CUDA build, the CUDA toolkit)
# No components asked for: both.
include(CMakePackageConfigHelpers)

set(KVPLAN_RUNTIME_TARGETS kvplan_base kvplan_kernels_cpu kvplan_plans kvplan_loader kvplan_runtime)
if(KVPLAN_WITH_CUDA)
  list(APPEND KVPLAN_RUNTIME_TARGETS kvplan_kernels_cuda)
endif()
foreach(target IN LISTS KVPLAN_RUNTIME_TARGETS)
  string(REPLACE "kvplan_" "" export_name ${target})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${export_name})
endforeach()
set(KVPLAN_PACKAGE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/kvplan)

install(TARGETS kvplan RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(TARGETS kvplan_capi_shared EXPORT kvplanCapiTargets LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS ${KVPLAN_RUNTIME_TARGETS} EXPORT kvplanRuntimeTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
# Headers keep their rooms ("runtime/model.h") under include/kvplan.
install(DIRECTORY base kernels plans loader runtime capi DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kvplan
        FILES_MATCHING PATTERN "*.h")
install(FILES ${PROJECT_BINARY_DIR}/base/build_info.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kvplan/base)
install(FILES ${PROJECT_BINARY_DIR}/plans/kvplan.pb.h plans/kvplan.proto
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kvplan/plans)

install(EXPORT kvplanCapiTargets NAMESPACE kvplan:: DESTINATION ${KVPLAN_PACKAGE_DIR})
install(EXPORT kvplanRuntimeTargets NAMESPACE kvplan:: DESTINATION ${KVPLAN_PACKAGE_DIR})
if(KVPLAN_WITH_CUDA)
  set(KVPLAN_PACKAGE_WITH_CUDA TRUE)
else()
  set(KVPLAN_PACKAGE_WITH_CUDA FALSE)
endif()
configure_package_config_file(cmake/kvplanConfig.cmake.in ${PROJECT_BINARY_DIR}/kvplanConfig.cmake
                              INSTALL_DESTINATION ${KVPLAN_PACKAGE_DIR})
# 0.x: a minor version may break the C++ API.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvplanConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvplanConfig.cmake ${PROJECT_BINARY_DIR}/kvplanConfigVersion.cmake
        DESTINATION ${KVPLAN_PACKAGE_DIR})

# kvplan.pc finds its prefix from where it lies (${pcfiledir}), so an install under any --prefix works.
file(RELATIVE_PATH KVPLAN_PC_TO_PREFIX /prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /prefix)
string(REGEX REPLACE "/$" "" KVPLAN_PC_TO_PREFIX "${KVPLAN_PC_TO_PREFIX}")
configure_file(cmake/kvplan.pc.in ${PROJECT_BINARY_DIR}/kvplan.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/kvplan.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
