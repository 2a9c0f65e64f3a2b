# Runs PROGRAM (with the optional arguments ARG and ARG2) and passes only if it exits
# with 0 AND its output matches the regular expression EXPECT. CTest's
# PASS_REGULAR_EXPRESSION alone would ignore the exit code, so a program
# that crashed after printing its summary line would pass.
#
#   cmake -DPROGRAM=<exe> [-DARG=<arg> [-DARG2=<arg>]] -DEXPECT=<regex> -P expect.cmake
if(DEFINED ARG)
  set(args "${ARG}")
else()
  set(args "")
endif()
if(DEFINED ARG2)
  list(APPEND args "${ARG2}")
endif()
execute_process(COMMAND "${PROGRAM}" ${args}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc STREQUAL "0")
  message(FATAL_ERROR "${PROGRAM} exited with ${rc}")
endif()
if(NOT out MATCHES "${EXPECT}")
  message(FATAL_ERROR "${PROGRAM}: output does not match '${EXPECT}'")
endif()
