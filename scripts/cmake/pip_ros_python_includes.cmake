# Injected with -DCMAKE_PROJECT_INCLUDE=<this file> when building against ROS 2 installed
# from PyPI wheels (scripts/setup does). The wheels export their *__rosidl_generator_py
# targets with the Python and NumPy include directories of the interpreter they were built
# with, which do not exist here, and CMake refuses imported targets with missing include
# directories. At the end of configuring, after every find_package has run, each such
# directory of an imported target is replaced by this interpreter's (Python3_EXECUTABLE).
# Directories that exist, and missing ones that are neither, are left as they are.

function(_mosaic_ros_fix_imported_python_includes directory)
  if(NOT Python3_INCLUDE_DIRS OR NOT Python3_NumPy_INCLUDE_DIRS)
    find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module NumPy)
  endif()
  get_property(imported_targets DIRECTORY "${directory}" PROPERTY IMPORTED_TARGETS)
  foreach(target IN LISTS imported_targets)
    get_target_property(includes "${target}" INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT includes)
      continue()
    endif()
    set(fixed "")
    set(changed FALSE)
    foreach(include IN LISTS includes)
      if(EXISTS "${include}" OR include MATCHES "^\\$<")
        list(APPEND fixed "${include}")
      elseif(include MATCHES "/numpy/")
        list(APPEND fixed ${Python3_NumPy_INCLUDE_DIRS})
        set(changed TRUE)
      elseif(include MATCHES "/include/python3")
        list(APPEND fixed ${Python3_INCLUDE_DIRS})
        set(changed TRUE)
      else()
        list(APPEND fixed "${include}")
      endif()
    endforeach()
    if(changed)
      list(REMOVE_DUPLICATES fixed)
      set_target_properties("${target}" PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${fixed}")
    endif()
  endforeach()
  get_property(subdirectories DIRECTORY "${directory}" PROPERTY SUBDIRECTORIES)
  foreach(subdirectory IN LISTS subdirectories)
    _mosaic_ros_fix_imported_python_includes("${subdirectory}")
  endforeach()
endfunction()

function(_mosaic_ros_fix_all_python_includes)
  _mosaic_ros_fix_imported_python_includes("${CMAKE_SOURCE_DIR}")
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _mosaic_ros_fix_all_python_includes)
