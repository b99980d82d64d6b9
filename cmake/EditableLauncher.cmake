# Where the standalone runner xvalid-run is installed.
# Under scikit-build-core the runner goes to the environment's bin/ (SKBUILD_SCRIPTS_DIR).
# An editable install's rebuild-on-import re-runs `cmake --install` long after the first
# install's temporary wheel directory (SKBUILD_SCRIPTS_DIR) is gone. So an editable install
# puts a launcher into bin/ that runs the build tree's runner, which every rebuild keeps
# current, and installs it only while that directory exists (the first install), so that
# rebuilds do not recreate it.
if(SKBUILD_STATE STREQUAL "editable")
  set(launcher "${CMAKE_BINARY_DIR}/editable-launcher/xvalid-run")
  file(GENERATE OUTPUT "${launcher}" CONTENT
       "#!/bin/sh\n# xvalid-run of an editable install: the build tree's runner, current after every rebuild\nexec \"$<TARGET_FILE:xvalid-run>\" \"$@\"\n")
  install(CODE "
    if(IS_DIRECTORY \"${SKBUILD_SCRIPTS_DIR}\")
      file(INSTALL \"${launcher}\" DESTINATION \"${SKBUILD_SCRIPTS_DIR}\"
           FILE_PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE GROUP_READ GROUP_EXECUTE WORLD_READ WORLD_EXECUTE)
    endif()")
elseif(SKBUILD)
  install(TARGETS xvalid-run DESTINATION "${SKBUILD_SCRIPTS_DIR}")
else()
  install(TARGETS xvalid-run DESTINATION bin)
endif()
