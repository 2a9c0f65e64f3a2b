# cmake -DOUT=<fatbin> -DLOG=<log> -P nvcc_fatbin.cmake -- <nvcc> <args...>
#
# Runs nvcc, writes everything it printed (ptxas -v reports on stderr) to LOG,
# and on failure removes OUT and fails with nvcc's output, so a compile error
# is never hidden in the log nor leaves a stale fatbin behind.
set(cmd)
set(after_dashes FALSE)
math(EXPR last "${CMAKE_ARGC} - 1")
foreach(i RANGE 0 ${last})
  if(after_dashes)
    list(APPEND cmd "${CMAKE_ARGV${i}}")
  elseif(CMAKE_ARGV${i} STREQUAL "--")
    set(after_dashes TRUE)
  endif()
endforeach()
if(NOT cmd OR NOT OUT OR NOT LOG)
  message(FATAL_ERROR "usage: cmake -DOUT=<fatbin> -DLOG=<log> -P nvcc_fatbin.cmake -- <nvcc> <args...>")
endif()

execute_process(COMMAND ${cmd} RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE out)
file(WRITE "${LOG}" "${out}")
if(NOT rc EQUAL 0)
  file(REMOVE "${OUT}")
  list(JOIN cmd " " line)
  message(FATAL_ERROR "nvcc failed (${rc}):\n${line}\n${out}")
endif()
